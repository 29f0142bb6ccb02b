"""megahf's stand-in for transformers' tests/exporters/test_export.py, which the sdist does not ship.

transformers' `ModelTesterMixin` inherits `ExportTesterMixin` from there (its ONNX / OpenVINO / ExecuTorch /
TensorRT / AOTI exporters and their skip lists). This stand-in keeps the one check that needs no optional backend:
every model class exports with `torch.export` and the exported program computes what eager mode computes.
"""

from __future__ import annotations

import copy
import inspect

import torch


class ExportTesterMixin:
    export_atol = 1e-5
    export_rtol = 1e-5

    def test_torch_export(self):
        if not getattr(self, "test_torch_exportable", True):
            self.skipTest("test_torch_exportable is False for this model")
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            with self.subTest(model_class.__name__):
                model = model_class(copy.deepcopy(config)).eval()
                inputs = {k: v for k, v in self._prepare_for_class(inputs_dict, model_class).items()
                          if isinstance(v, torch.Tensor)}
                if "use_cache" in inspect.signature(model.forward).parameters:
                    inputs["use_cache"] = False
                with torch.no_grad():
                    eager = model(**inputs)
                    program = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                    exported = program.module()(**inputs)
                eager_tensors = [t for t in eager.to_tuple() if isinstance(t, torch.Tensor)]
                exported_tensors = [exported[k] for k in eager.keys() if isinstance(eager[k], torch.Tensor)]
                self.assertEqual(len(eager_tensors), len(exported_tensors))
                for a, b in zip(eager_tensors, exported_tensors):
                    torch.testing.assert_close(b, a, atol=self.export_atol, rtol=self.export_rtol)

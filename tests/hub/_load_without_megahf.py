"""Run in a fresh process (by test_push_and_load.py): load models from the Hub stand-in as a user without megahf
would, and save their logits. `import megahf` is made impossible first, so the test proves the Hub copy needs
nothing of megahf.

    python _load_without_megahf.py JOBS.json OUT_DIR
"""

import importlib.abc
import json
import re
import sys


class _NoMegahf(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "megahf" or name.startswith("megahf."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the Hub copy must load without megahf)")
        return None


sys.meta_path.insert(0, _NoMegahf())
sys.path = [p for p in sys.path if not p.endswith("/src")]

report = {}
try:
    import megahf  # noqa: F401
    report["megahf_importable"] = True
except ImportError as error:
    report["megahf_importable"] = False
    report["megahf_error"] = str(error)

import torch  # noqa: E402
import transformers  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
out = sys.argv[2]
logits = {}
for job in jobs:
    name = job["name"]
    revision = job.get("revision")
    if job["kind"] == "model":
        cls = getattr(transformers, job["auto"])
        model = cls.from_pretrained(job["repo"], revision=revision, trust_remote_code=True).eval()
        report[f"{name}.class"] = f"{type(model).__module__}.{type(model).__name__}"
    elif job["kind"] == "peft":
        from peft import PeftModel

        cls = getattr(transformers, job["auto"])
        base = cls.from_pretrained(job["base"], trust_remote_code=True, **job.get("base_kwargs", {}))
        model = PeftModel.from_pretrained(base, job["repo"], revision=revision).eval()
        report[f"{name}.class"] = type(model).__name__
    elif job["kind"] == "snippet":
        card = open(hf_hub_download(job["repo"], "README.md", revision=revision), encoding="utf-8").read()
        code = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
        torch.manual_seed(0)
        exec(compile(code, f"{job['repo']} card snippet", "exec"), {})
        report[f"{name}.ran"] = True
        continue
    with torch.no_grad():
        output = model(input_ids=torch.tensor(job["input"]))
    logits[name] = output.logits.contiguous()
save_file(logits, f"{out}/logits.safetensors")
report["loaded_megahf_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "megahf")
json.dump(report, open(f"{out}/report.json", "w"), indent=2)

"""`Tee`: a benchmark's stdout also written to its result file (`--out`), so the committed result is exactly what the
run printed."""

from __future__ import annotations


class Tee:
    def __init__(self, stream, path: str):
        self.stream, self.file = stream, open(path, "w", encoding="utf-8")

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

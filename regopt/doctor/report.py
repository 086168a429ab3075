"""The doctor's report: the parts' results as terminal text, markdown and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .parts import PartResult

_MARKS = {"ok": "ok", "warn": "note", "fail": "FAIL", "skip": "skip", "error": "ERROR", "timeout": "TIMEOUT"}


@dataclass
class Report:
    """What ``python -m regopt.doctor`` / :func:`regopt.doctor.run` found: the setting and one result per part."""

    setting: dict[str, Any]
    parts: list[PartResult] = field(default_factory=list)

    def part(self, name: str) -> PartResult:
        """The result of the part ``name`` ("exact", "reference", "fd", "timing", "contract")."""
        return next(p for p in self.parts if p.name == name)

    def text(self) -> str:
        lines = [f"regopt doctor: {self.setting['model']} ({self.setting['parameters']:,} parameters), "
                 f"batch {self.setting['batch_size']}, micro-batch {self.setting['micro_batch_size']}, "
                 f"λ = {self.setting['penalty']:g}, device {self.setting['device']}"]
        for i, part in enumerate(self.parts, 1):
            lines.append(f"{i}. [{_MARKS[part.status]}] {part.title}: {part.verdict}  ({part.seconds:.1f} s)")
            lines += [f"     {detail}" for detail in part.details]
        return "\n".join(lines)

    def markdown(self) -> str:
        s = self.setting
        lines = ["# regopt doctor report", "",
                 f"Model `{s['model']}` ({s['parameters']:,} parameters), batch {s['batch_size']}, micro-batch "
                 f"{s['micro_batch_size']}, λ = {s['penalty']:g}, device `{s['device']}`; torch {s['torch']}, "
                 f"regopt {s['regopt']}.", "", "| # | part | status | verdict | time |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {p.title} | {_MARKS[p.status]} | {_escape(p.verdict)} | {p.seconds:.1f} s |"
                  for i, p in enumerate(self.parts, 1)]
        for i, part in enumerate(self.parts, 1):
            if part.details:
                lines += ["", f"## {i}. {part.title}", ""] + [f"- {_escape(detail)}" for detail in part.details]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return _finite({"setting": self.setting, "parts": [asdict(part) for part in self.parts]})

    def write(self, out: str | Path) -> list[Path]:
        """report.txt, report.md and report.json under the folder ``out`` (created); returns their paths."""
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"report.txt": self.text() + "\n", "report.md": self.markdown(),
                 "report.json": json.dumps(self.to_json(), indent=2) + "\n"}
        for name, content in files.items():
            (folder / name).write_text(content, encoding="utf-8")
        return [folder / name for name in files]


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

"""report.json / report.md for a run, and the facts about the environment that go in them."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from .core.safe_io import write_json_atomic, write_text_atomic
from .core.serialization import is_legacy_checkpoint

CHECKPOINT_DIR = "checkpoint"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# what an older runner left behind when interrupted: ".checkpoint.tmp-*", ".checkpoint.old-PID", ".report.md.tmp"
_LEGACY_LEFTOVER = re.compile(r"^\.(checkpoint\.(tmp|old)-.*|report\.md\.tmp|report\.json\..*)$")


def cpu_name() -> str:
    """The CPU's model name: fp32 results can differ in the last digits between CPUs (the kernels'
    summation order follows the instruction set), so reports say which one produced them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    env = {
        "cpu": cpu_name(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        env["archquant"] = version("archquant")
    except Exception:  # running from a source tree without an install
        env["archquant"] = None
    try:
        root = Path(__file__).resolve().parent.parent
        env["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (the FP model's in-memory/on-disk size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _spec_text(spec: dict | None) -> str:
    """"int8 token", "twinlog4 channel", "int4 group64" from a QuantSpec dict."""
    if not spec:
        return "fp"
    fmt = spec.get("format", "int")
    bits = spec.get("bits") if fmt in ("int", "twinlog") else ""
    gran = spec.get("granularity", "")
    group = spec.get("group_size") if gran == "group" else ""
    asym = "" if spec.get("symmetric", True) else " asymmetric"
    return f"{fmt}{bits}{asym} {gran}{group or ''}".strip()


def _transform_text(cfg: dict | None) -> str:
    if not cfg:
        return ""
    label = cfg.get("label") or {}
    parts = cfg.get("parts")
    kinds = "+".join(p.get("type", "?") for p in parts) if parts else cfg.get("type", "?")
    return kinds + (" (" + ", ".join(f"{k} {_fmt(v)}" for k, v in label.items()) + ")" if label else "")


def quantized_modules(model: nn.Module) -> dict:
    """What a recipe did, module by module: each quantized module's weight and input formats and its
    online input transform (with the transform's label, e.g. LRQ-DiT's ARS branch and J), and the
    Linears left in floating point."""
    from .core.modules import QuantConv1d, QuantLinear

    rows, kept = [], []
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantConv1d)):
            cfg = m.to_config()
            q = cfg.get("input_quantizer")
            inp = "fp" if not q else f"{_spec_text(q.get('spec'))} {'dynamic' if q.get('dynamic') else 'static'}"
            transform = cfg.get("input_transform") or {}
            rows.append({"module": name, "weight": _spec_text((cfg.get("weight") or {}).get("spec")),
                         "input": inp, "transform": _transform_text(transform), "label": transform.get("label") or {}})
        elif isinstance(m, nn.Linear):
            kept.append(name)
    return {"modules": rows, "kept_fp_linears": kept}


def _quantized_section(summary: dict | None) -> list[str]:
    if not summary:
        return []
    rows, kept = summary.get("modules") or [], summary.get("kept_fp_linears") or []
    branches: dict[str, int] = {}
    for r in rows:  # LRQ-DiT's adaptive rotation: how many Linears took each branch
        if "ars" in (r.get("label") or {}):
            branches[r["label"]["ars"]] = branches.get(r["label"]["ars"], 0) + 1
    lines = ["", f"## Quantized modules ({len(rows)}; {len(kept)} Linears kept in floating point)", ""]
    if branches:
        lines += ["Adaptive rotation branches: " + ", ".join(f"{b} {n}" for b, n in sorted(branches.items()))
                  + " (J = RMS of the smoothed calibration activations, per Linear below)", ""]
    lines += ["<details><summary>per module: weight, input, online transform</summary>", "",
              "| module | weight | input | input transform |", "|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['weight']} | {r['input']} | {r['transform'] or '–'} |" for r in rows]
    if kept:
        lines += ["", "Kept in floating point: " + ", ".join(f"`{n}`" for n in kept)]
    return lines + ["", "</details>"]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)  # nan, inf, -inf: a collapsed model is reported, not hidden
        if v != 0 and not 1e-3 <= abs(v) < 1e6:
            return f"{v:.3e}"  # a perplexity of 1e106 is not 107 digits
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _rel(q, fp) -> str:
    if not isinstance(q, (int, float)) or not isinstance(fp, (int, float)) or fp == 0:
        return ""
    if not (math.isfinite(q) and math.isfinite(fp)):
        return ""
    pct = 100.0 * (q - fp) / abs(fp)
    return f" ({pct:+.2f}%)" if abs(pct) < 1000 else f" (×{q / fp:.3g})"  # a collapse reads as a ratio


def _columns(report: dict) -> list[tuple[str, dict]]:
    """The metric columns: the family's declared metrics first (their order), then any other
    metric a row has (e.g. lm-eval tasks), each with its metadata (direction, unit, vs FP)."""
    info = dict(report.get("metrics_info") or {})
    rows = [report["metrics"].get("fp") or {}, report["metrics"].get("quantized") or {},
            *((c.get("metrics") or {}) for c in (report.get("compare") or {}).values()),
            (report.get("real") or {}).get("metrics") or {}]
    names = [n for n in info if any(n in r for r in rows)]
    names += [n for r in rows for n in r if n not in info and n not in names]
    return [(n, info.get(n, {})) for n in dict.fromkeys(names)]


def _header(name: str, meta: dict) -> str:
    arrow = {True: " ↓", False: " ↑"}.get(meta.get("lower_is_better"), "")
    unit = f" ({meta['unit']})" if meta.get("unit") else ""
    return f"{name}{unit}{arrow}" + (" vs FP" if meta.get("relative_to_fp") and "vs_fp" not in name else "")


def _mb(n) -> str:
    return "–" if n is None else f"{n / 2**20:.2f} MiB"


def _model_source(report: dict) -> str:
    """The model's path, or which committed reference model a family loaded when the config gave none."""
    if report["model"]["path"]:
        return report["model"]["path"]
    reference = (((report.get("config") or {}).get("model") or {}).get("options") or {}).get("reference")
    return f"committed reference model `{reference}` (models/reference/{reference})" if reference \
        else "(built-in default)"


def _disjointness(summary) -> str:
    if not isinstance(summary, dict):
        return "disjoint"
    compared = summary.get("compared_by")
    return (f"disjoint: no shared content among {summary.get('calibration_items')} calibration and "
            f"{summary.get('evaluation_items')} evaluation items" + (f" ({compared})" if compared else ""))


def _output_notes(output: dict) -> list[str]:
    notes = [f"- removed the leftover of an interrupted run: `{p}`" for p in output.get("removed_leftovers") or []]
    notes += [f"- a leftover of an interrupted run held other files; they were kept at `{p}`"
              for p in output.get("kept_leftovers") or []]
    if output.get("kept_aside"):
        notes.append(f"- files someone added to the previous `{output['dir']}` were kept at `{output['kept_aside']}`")
    return notes


def render_markdown(report: dict) -> str:
    fp = report["metrics"]["fp"]
    q = report["metrics"]["quantized"]
    cols = _columns(report)
    lines = [
        f"# archquant report: {report['family']} / {report['method']['name']}",
        "",
        f"- model: {_model_source(report)}",
        f"- calibration: {report['data']['calibration']} ({report['data']['calibration_items']} items); "
        f"evaluation: {report['data']['evaluation']} ({report['data']['evaluation_items']} items); "
        f"{_disjointness(report['data'].get('disjointness'))}",
        *_output_notes(report.get("output") or {}),
        *(f"- note ({report['method']['name']}): {n}" for n in report.get("method_notes") or []),
        *(f"- note ({name}): {n}" for name, c in (report.get("compare") or {}).items() for n in c.get("notes") or []),
        *(f"- note (evaluation): {n}" for n in report.get("evaluation_notes") or []),
        "",
        "| model | " + " | ".join(_header(n, m) for n, m in cols) + " | size on disk | calibration+quantize time |",
        "|---|" + "---|" * len(cols) + "---|---|",
    ]

    def cell(metrics: dict, name: str, meta: dict, is_fp: bool) -> str:
        if name not in metrics:
            return "–"
        v = metrics[name]
        if is_fp or meta.get("relative_to_fp"):
            return _fmt(v)  # a metric against FP has no FP value to be relative to
        return _fmt(v) + _rel(v, fp.get(name))

    def row(label: str, metrics: dict, size, seconds, is_fp: bool = False) -> str:
        return (f"| {label} | " + " | ".join(cell(metrics, n, m, is_fp) for n, m in cols)
                + f" | {size} | {'–' if seconds is None else f'{_fmt(seconds)} s'} |")

    lines.append(row("FP", fp, _mb(report["model"]["fp_bytes"]), None, is_fp=True))
    for name, c in (report.get("compare") or {}).items():
        lines.append(row(name, c["metrics"], f"{_mb(c['bytes'])} (in memory)", c["seconds"]))
    ckpt = report.get("checkpoint") or {}
    qname = report["method"]["name"]
    lines.append(row(f"**{qname}**", q, _mb(ckpt.get("bytes")), report["timings"].get(f"quantize ({qname})")))
    real = report.get("real")
    if real:  # backend=real: the same model on int8 kernels
        lines.append(row(f"{qname} (real int8)", real["metrics"], f"{_mb(real['bytes'])} (in memory)", None))
    lines.append("")
    if real:
        blocks = real.get("blocks") or []
        whole = f" ({len(blocks)} whole blocks incl. their non-Linear ops)" if blocks else ""
        lines.append(f"Real int8 backend ({real.get('kernels', 'auto')} kernels): {real['converted']} Linears on int8 "
                     f"kernels{whole}, {len(real['kept'])} quantized modules kept fake-quant; evaluation "
                     f"{_fmt(real['eval_seconds']['fake'])} s fake-quant, {_fmt(real['eval_seconds']['real'])} s real.")
    reload = report.get("reload")
    if reload is not None:
        ok = "identical" if reload["identical"] else "DIFFERENT"
        outputs = " probe-batch outputs bit-identical (torch.equal);" if reload.get("outputs_identical") else ""
        loose = reload.get("not_reproducible") or []
        extra = f" (not bit-reproducible, not checked: {', '.join(loose)})" if loose else ""
        lines.append(f"Saved checkpoint `{ckpt.get('path')}` reloaded:{outputs} metrics {ok}{extra}.")
    lines.append("Stage timings (s): " + ", ".join(f"{k} {v}" for k, v in report["timings"].items()
                                                    if not isinstance(v, dict)))
    peaks = {k: v for k, v in (report.get("peak_rss_mib") or {}).items() if v is not None}
    if peaks:
        lines.append(f"Peak resident memory: {max(peaks.values()):.0f} MiB (after each stage: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + ").")
    env = report.get("environment") or {}
    if env:  # last-digit metrics depend on the CPU and thread count (fp32 summation order)
        lines.append(f"Environment: {env.get('cpu') or env.get('processor')}, {env.get('threads')} threads, "
                     f"torch {env.get('torch')}, Python {env.get('python')}, archquant {env.get('git_commit') or env.get('archquant')}.")
    lines += _quantized_section(report.get("quantized_modules"))
    lines += _files_section(report.get("artifacts") or [])
    return "\n".join(lines) + "\n"


def _files_section(artifacts: list[dict]) -> list[str]:
    """Links to every file an evaluation wrote: a line each, and for files that name their ``row`` and
    ``column`` (one item in several forms) a table per model, in the order they were written."""
    if not artifacts:
        return []
    lines = ["", "## Files", ""]
    lines += [f"- [{a['title']}]({a['path']})" for a in artifacts if "row" not in a]
    tables: dict[str, dict[str, dict[str, str]]] = {}
    for a in artifacts:
        if "row" in a:
            tables.setdefault(a.get("model", ""), {}).setdefault(a["row"], {})[a["column"]] = a["path"]
    for model, rows in tables.items():
        columns = list(dict.fromkeys(c for cells in rows.values() for c in cells))
        lines += ["", f"{'FP' if model == 'fp' else model}:", "", "| item | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for row, cells in rows.items():
            links = [f"[{c}]({cells[c]})" if c in cells else "–" for c in columns]
            lines.append(f"| {row.replace('|', '/')} | " + " | ".join(links) + " |")
    return lines


def write_reports(report: dict, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / REPORT_JSON, report)
    write_text_atomic(out_dir / REPORT_MD, render_markdown(report))


def is_legacy_output(directory: Path) -> bool:
    """An output_dir written by an archquant that predates marker files: only what the runner
    writes (reports, checkpoint, and that version's temporary leftovers), with a report of ours."""
    try:
        entries = set(os.listdir(directory))
        leftovers = {e for e in entries if _LEGACY_LEFTOVER.match(e)}
        if REPORT_JSON not in entries or not entries - leftovers <= {CHECKPOINT_DIR, REPORT_JSON, REPORT_MD}:
            return False
        checkpoint = Path(directory) / CHECKPOINT_DIR
        if CHECKPOINT_DIR in entries and not is_legacy_checkpoint(checkpoint):
            return False
        report = json.loads((Path(directory) / REPORT_JSON).read_text())
        return isinstance(report, dict) and {"family", "method", "environment"} <= set(report)
    except (OSError, ValueError):
        return False

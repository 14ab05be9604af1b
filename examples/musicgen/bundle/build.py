"""Export a MusicGen to an ONNX bundle that honours a precision plan (the CLI is ``export.py``).

``OUT/`` holds ``config.json`` (with the dtype chosen per part under ``transformers.js_config``),
``generation_config.json``, the tokenizer files and ``OUT/onnx/`` with ``text_encoder``,
``decoder_model_merged`` and ``encodec_decode``, each named the way transformers.js expects for its
dtype (``bundle.parts.part_file``). ``OUT/export_report.json`` lists per part the dtype, bytes, plan
conformance and parity against PyTorch, and every file of the bundle.

What the export guarantees about the folder it writes:

- it is built in a staging folder next to ``OUT`` (``.OUT.export-*``) and moved in only once every
  graph exported, validated and (for a plan) conformed: a failed export leaves ``OUT`` as it was;
- a non-empty ``OUT`` that is not a kdq bundle is refused (nothing of the user's is deleted); over a
  previous bundle, only that bundle's own files (listed in its report) are replaced or removed;
- staging folders left by a killed export (their process is gone) are removed by the next export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kdq.errors import KdqError, bad_value
from kdq.export.atomic import save_onnx_atomic, write_text_atomic
from kdq.export.merge import merge_decoders
from kdq.export.onnx_export import compare_onnx, export_onnx, validate_onnx
from musicgen.bundle.parts import GRAPHS, INPLACE_KEY, PARTS, TJS_DTYPE, DecoderStep, merged_checks, part_file

REPORT = "export_report.json"
STAGING = ".export-"
#: Values of ``export_bundle(decoder=...)``.
DECODERS = ("merged", "inplace", "both")


class BundleError(KdqError):
    """Bad arguments to the bundle export, or an output folder it must not write into."""


def export_graphs(model, workdir: Path, *, atol: float = 1e-4, names: Any = None) -> dict[str, dict[str, Any]]:
    """Export every graph of ``bundle.parts.GRAPHS`` (or those in ``names``) in fp32 and validate it on
    other shapes.

    The tracer's warnings (``kdq.export.TraceWarning``: transformers' masking, cache and EnCodec code
    branch on shapes) are recorded in the report rather than printed: each graph is validated on
    inputs of other lengths (``GRAPHS[i].checks``: no past and a cache, several lengths), and the
    bundle end to end against ``generate``, which is what would catch a wrong branch.
    """
    import warnings

    from kdq.export import TraceWarning

    out = {}
    for g in GRAPHS:
        if names is not None and g.name not in names:
            continue
        module, outputs = g.wrap(model), g.outputs(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TraceWarning)
            path = export_onnx(module, g.example(model), workdir / f"{g.name}.onnx", output_names=outputs,
                               dynamic_axes=g.axes(model))
        report = validate_onnx(path, module, g.checks(model), output_names=outputs, atol=atol)
        traced = [str(w.message).split(";")[0].removeprefix("export_onnx: ") for w in caught if issubclass(w.category, TraceWarning)]
        for w in caught:
            if not issubclass(w.category, TraceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        out[g.name] = {"path": path, "parity": report.to_json(), "trace_warnings": traced}
    return out


def _bundle_config(model, dtypes: dict[str, str], kv_cache_dtype: str = "float32") -> dict[str, Any]:
    """``config.json``: the model config plus the per-file dtypes (and the KV cache dtype of the
    decoder's variant) where transformers.js reads them."""
    cfg = model.config.to_dict()
    tjs: dict[str, Any] = {"dtype": {part: TJS_DTYPE[d] for part, d in dtypes.items()}}
    if kv_cache_dtype != "float32":
        tjs["kv_cache_dtype"] = {TJS_DTYPE[dtypes["decoder_model_merged"]]: kv_cache_dtype}
    cfg["transformers.js_config"] = tjs
    return cfg


def _parity(model, path: Path, part: str, strict: bool, atol: float) -> dict[str, Any]:
    """The shipped file against PyTorch: strict for all-fp32 parts, SNR and max diff otherwise."""
    if part == "decoder_model_merged":
        checks = merged_checks(model)
        groups = {label: [f for lab, f in checks if lab == label] for label in ("first_step", "cached_step")}
        modules = {"first_step": DecoderStep(model, with_past=False), "cached_step": DecoderStep(model, with_past=True)}
        outputs = next(g for g in GRAPHS if g.name == "decoder_model").outputs(model)
    else:
        g = next(g for g in GRAPHS if g.name == part)
        groups, modules, outputs = {"": g.checks(model)}, {"": g.wrap(model)}, g.outputs(model)
    result: dict[str, Any] = {}
    for label, feeds in groups.items():
        if strict:
            res = validate_onnx(path, modules[label], feeds, output_names=outputs, atol=atol).to_json()
        else:
            res = {"snr_db_and_max_abs_diff": compare_onnx(path, modules[label], feeds, output_names=outputs)}
        result.update({label: res} if label else res)
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(out: Path) -> None:
    """Remove staging folders of earlier exports to ``out`` whose process is gone."""
    for stage in out.parent.glob(f".{out.name}{STAGING}*"):
        try:
            pid = int((stage / "pid").read_text())
        except (OSError, ValueError):
            pid = None
        if pid is None or not _alive(pid):
            shutil.rmtree(stage, ignore_errors=True)


def _own_files(out: Path) -> list[str] | None:
    """Files of the kdq bundle in ``out`` (None if ``out`` is not one)."""
    try:
        report = json.loads((out / REPORT).read_text())
    except (OSError, ValueError):
        return None
    files = report.get("files") if isinstance(report, dict) else None
    return files if isinstance(files, list) else None


def _check_target(out: Path) -> list[str]:
    """The previous bundle's files in ``out`` (empty for a new folder); refuse a folder of someone else's."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise bad_value(BundleError, "out", str(out), "a folder (it is a file)", "choose another --out")
    own = _own_files(out)
    if own is None and any(out.iterdir()):
        raise bad_value(BundleError, "out", str(out), "an empty folder or an earlier kdq bundle (it holds other files)",
                        "choose an empty or new folder; kdq never deletes files it did not write")
    return own or []


def _install(stage: Path, out: Path, previous: list[str]) -> None:
    """Move the staged bundle into ``out`` file by file; remove the previous bundle's leftovers; the
    report (the list of the bundle's files) goes last."""
    files = sorted(str(f.relative_to(stage)) for f in stage.rglob("*") if f.is_file() and f.name != "pid")
    out.mkdir(parents=True, exist_ok=True)
    for rel in [f for f in files if f != REPORT] + [REPORT]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, out / rel)
    for rel in set(previous) - set(files):
        (out / rel).unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)


def export_bundle(model: Any, out: str | Path, *, plan: Any = "fp32", tokenizer: Any = None, atol: float = 1e-4,
                  progress: bool = True, desc: str = "export", int4_block_size: int = 32,
                  decoder: str = "merged") -> dict[str, Any]:
    """Export ``model`` (a folder or hub id, or a loaded ``MusicgenForConditionalGeneration``) to ``out``.

    Args:
        model: a folder or hub id (its tokenizer is saved too), or a loaded model.
        out: the bundle folder (see the module docstring for what is refused and what is replaced).
        plan: ``"fp32"`` or a ``kdq.quant.Plan`` (read, never changed; every rule must name a module).
        tokenizer: the tokenizer to save with a loaded model (a folder brings its own).
        atol: parity tolerance against PyTorch for parts whose weights are all fp32.
        progress: show a progress bar (labelled ``desc``, with the current step).
        int4_block_size: block size of the plan's 4-bit weights (``MatMulNBits``). 32 is the default;
            on a 2-core x86 CPU a MusicGen-small decoder with 128 ran its cached step 1.16x faster
            (docs/device.md, "Loop options"), at a logit SNR 1.5 dB lower.
        decoder: which decoder graphs the bundle holds. ``"merged"`` (the default):
            ``decoder_model_merged``, the TorchScript export transformers.js loads. ``"inplace"``:
            kdq's hand-written ``cross_kv`` and ``decoder_step`` graphs with a KV cache updated in place
            (``musicgen.bundle.fast_decoder``; run by ``MusicgenOnnx``, not by transformers.js; no fp16
            in the decoder). ``"both"``: both kinds (``MusicgenOnnx(decoder=...)`` picks one).

    Returns the export report (also written to ``out/export_report.json``).
    """
    from tqdm.auto import tqdm

    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    if isinstance(model, (str, Path)):
        model_obj, tok, source = load_musicgen(model), load_tokenizer(model), str(model)
    else:
        model_obj, tok, source = model, tokenizer, type(model).__name__
    if isinstance(int4_block_size, bool) or not isinstance(int4_block_size, int) or int4_block_size < 16 \
            or int4_block_size & (int4_block_size - 1):
        raise bad_value(BundleError, "int4_block_size", int4_block_size, "a power of two >= 16 (MatMulNBits blocks)")
    if decoder not in DECODERS:
        raise bad_value(BundleError, "decoder", decoder, f"one of {list(DECODERS)}")
    merged_too = decoder in ("merged", "both")
    if decoder != "merged":
        from musicgen.bundle.fast_decoder import check_inplace_plan

        check_inplace_plan(model_obj, plan)
    out = Path(out)
    previous = _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}", dir=out.parent))
    (stage / "pid").write_text(str(os.getpid()))
    try:
        bar = tqdm(total=5 if decoder != "merged" else 4, desc=desc, disable=not progress)
        bar.set_postfix_str("export and validate graphs")
        work = stage / "_graphs"
        work.mkdir()
        names = [g.name for g in GRAPHS if merged_too or g.part != "decoder_model_merged"]
        exported = export_graphs(model_obj, work, atol=atol, names=names)
        parts = [p for p in PARTS if merged_too or p != "decoder_model_merged"]
        graphs = {name: Path(v["path"]) for name, v in exported.items()}
        bar.update(1)
        bar.set_postfix_str("apply the plan")
        plan_report, dtypes = None, {p: "fp32" for p in parts}
        if plan != "fp32":
            from musicgen.bundle.precision import apply_bundle_plan

            graphs, dtypes, plan_report = apply_bundle_plan(model_obj, graphs, plan, work, int4_block_size=int4_block_size)
        bar.update(1)
        bar.set_postfix_str("merge the decoder")
        import onnx

        files = {part: stage / part_file(part, dtypes[part]) for part in parts}
        (stage / "onnx").mkdir()
        if merged_too:
            merged = merge_decoders(onnx.load(str(graphs["decoder_model"])), onnx.load(str(graphs["decoder_with_past_model"])))
            save_onnx_atomic(merged, files["decoder_model_merged"])
            del merged
        for part in ("text_encoder", "encodec_decode"):
            shutil.copyfile(graphs[part], files[part])
        bar.update(1)
        bar.set_postfix_str("parity of the shipped files")
        report: dict[str, Any] = {"kdq_bundle": 1, "source": source,
                                  "plan": plan_report["plan"] if plan_report else "fp32", "parts": {}}
        if plan_report:
            report["int4_block_size"] = int4_block_size
        for part, path in files.items():
            strict = plan_report is None or set(plan_report["parts"][part]["planned_weight_bytes_fp32"]) <= {"fp32"}
            entry = {"file": str(path.relative_to(stage)), "dtype": dtypes[part], "bytes": path.stat().st_size,
                     "parity": _parity(model_obj, path, part, strict, atol),
                     "parity_kind": f"strict atol={atol:g}" if strict else "measured against PyTorch fp32"}
            if plan_report:
                entry.update({k: v for k, v in plan_report["parts"][part].items() if k not in entry})
            report["parts"][part] = entry
        inplace = None
        if decoder != "merged":
            from musicgen.bundle.fast_decoder import export_inplace

            bar.set_postfix_str("in-place decoder graphs")
            inplace = export_inplace(model_obj, stage / "onnx", plan, atol=atol, int4_block_size=int4_block_size)
            report["parts"].update(inplace)
            bar.update(1)
        report["decoder"] = decoder
        report["bundle_bytes"] = sum(e["bytes"] for e in report["parts"].values())
        report["trace_warnings"] = {name: v["trace_warnings"] for name, v in exported.items() if v["trace_warnings"]}
        shutil.rmtree(work)
        kv = plan_report["parts"]["decoder_model_merged"]["kv_cache_dtype"] if plan_report and merged_too else "float32"
        config = _bundle_config(model_obj, dtypes, kv)
        if inplace:
            config[INPLACE_KEY] = {name: {"file": e["file"], "dtype": TJS_DTYPE[e["dtype"]]} for name, e in inplace.items()}
        write_text_atomic(stage / "config.json", json.dumps(config, indent=2))
        write_text_atomic(stage / "generation_config.json", json.dumps(model_obj.generation_config.to_dict(), indent=2))
        if tok is not None:
            tok.save_pretrained(stage)
        report["files"] = sorted([str(f.relative_to(stage)) for f in stage.rglob("*") if f.is_file() and f.name != "pid"]
                                 + [REPORT])
        write_text_atomic(stage / REPORT, json.dumps(report, indent=2))
        bar.update(1)
        bar.close()
        _install(stage, out, previous)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def resolve_plan_arg(plan: str) -> Any:
    """``fp32``, ``paper`` (TinyMusician's plan) or a path to a plan JSON file."""
    if plan == "fp32":
        return "fp32"
    if plan == "paper":
        from musicgen.plan import paper_plan

        return paper_plan()
    path = Path(plan)
    if path.suffix == ".json" and path.is_file():
        from kdq.quant import Plan

        return Plan.load(path)
    raise bad_value(BundleError, "--plan", plan, "'fp32', 'paper' or an existing PLAN.json file")


def export_stage(cfg: Any, model_dir: str, plans: dict[str, str], folder: Path, *, progress: bool = True) -> dict:
    """The pipeline's export stage: ``model_dir`` as three bundles (fp32, paper plan, kdq plan), the
    fp32 bundle's end-to-end parity with ``generate``, and a device run of each bundle.

    Parity: greedy guided audio of the ONNX Runtime loop against transformers'
    ``generate(do_sample=False)``. Device runs: ``device_run.py`` in a fresh process each (so peak RSS
    is the run's own), ``cfg.device_threads`` threads, sampled, ``.ort`` format when asked. Any
    failure stops the stage with its error.
    """
    import subprocess
    import sys

    import numpy as np
    from tqdm.auto import tqdm

    from kdq.quant import Plan
    from musicgen.bundle.runtime import MusicgenOnnx
    from musicgen.models.musicgen import load_musicgen, load_tokenizer

    bundles = {}
    for label, plan in {"fp32": "fp32", "paper_plan": Plan.load(plans["paper"]), "kdq_plan": Plan.load(plans["kdq"])}.items():
        report = export_bundle(model_dir, folder / label, plan=plan, progress=progress, desc=f"export {label}")
        bundles[label] = {"path": str(folder / label), "bytes": report["bundle_bytes"],
                          "parts": {p: {k: v for k, v in e.items() if k in ("dtype", "bytes", "parity", "file")}
                                    for p, e in report["parts"].items()}}
    bar = tqdm(total=1 + len(bundles), desc="parity and device runs", disable=not progress)
    bar.set_postfix_str("generate: transformers and ONNX Runtime")
    model, tok = load_musicgen(model_dir), load_tokenizer(model_dir)
    prompt = "a slow chorale on organ"
    frames = max(int(cfg.device_seconds * 50), 8)
    reference = model.generate(**tok([prompt], return_tensors="pt"), do_sample=False, guidance_scale=3.0,
                               max_new_tokens=frames + 3).numpy()
    audio = MusicgenOnnx(bundles["fp32"]["path"], threads=cfg.device_threads).generate(
        [prompt], max_new_tokens=frames + 3, guidance_scale=3.0)
    n = min(reference.shape[-1], audio.shape[-1])
    bar.update(1)
    script = Path(__file__).resolve().parents[1] / "device_run.py"
    runs = {}
    for label, b in bundles.items():
        bar.set_postfix_str(f"device run {label}")
        cmd = [sys.executable, str(script), "--bundle", b["path"], "--prompt", prompt, "--seconds", str(cfg.device_seconds),
               "--out", str(folder / f"{label}_device.wav"), "--threads", str(cfg.device_threads),
               *(["--ort-format"] if cfg.ort_format else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise BundleError(f"the device run of the {label} bundle failed (exit {proc.returncode}): {proc.stderr[-800:]}")
        runs[label] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                       "command": " ".join(["python", "examples/musicgen/device_run.py", *cmd[2:]])}
        bar.update(1)
    bar.close()
    graph = [e["parity"] for e in bundles["fp32"]["parts"].values()]
    return {"bundles": bundles, "device_runs": runs, "parity_max_abs": float(np.abs(reference[..., :n] - audio[..., :n]).max()),
            "graph_parity_max_abs": max(_max_diff(p) for p in graph), "rtf": runs["fp32"]["rtf"],
            "threads": cfg.device_threads, "prompt": prompt}


def _max_diff(parity: Any, *, inside: bool = False) -> float:
    """The largest number under any ``max_abs_diff`` key of a parity report (0.0 if none)."""
    if isinstance(parity, (int, float)) and not isinstance(parity, bool):
        return float(parity) if inside else 0.0
    if isinstance(parity, dict):
        return max([_max_diff(v, inside=inside or k == "max_abs_diff") for k, v in parity.items()] or [0.0])
    if isinstance(parity, list):
        return max([_max_diff(v, inside=inside) for v in parity] or [0.0])
    return 0.0

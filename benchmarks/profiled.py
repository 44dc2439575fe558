"""Run a benchmark child (a ``kilter`` command or a TRL worker script) under ``torch.profiler``.

    BENCH_PROFILE_DIR=benchmarks/out/profiles benchmarks/.venv-trl/bin/python benchmarks/bench_rm.py ...
    benchmarks/.venv-trl/bin/python benchmarks/profiled.py --show benchmarks/out/profiles

With ``BENCH_PROFILE_DIR`` set, ``common.run_child`` starts every child through this file: the
same command, the same process, and a global optimizer-step hook (``torch.optim``'s
``register_optimizer_step_post_hook``, so it needs nothing from either library) that starts the
profiler after optimizer step ``--skip`` and stops it after ``--steps`` more. Profiled runs are
slower (the profiler records every operator and its input shapes): their timings are not
benchmark figures; what they give is where each library's step goes, per operator class, at the
same settings. ``--show DIR`` prints the side-by-side table of every profile in DIR.

Operator classes (self CPU time, so nothing is counted twice): matmuls of the model's own weights,
skinny matmuls (an operand with a dimension <= 8: LoRA's rank-r products and the 1-wide value
/ reward heads), attention (SDPA's kernels and their backward), element-wise (the normalisation,
rotary, activation and residual arithmetic and their gradients), data movement (copies, cats,
index, fill), the optimizer, and the rest.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

SKINNY = 8
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm")
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention", "aten::_softmax", "softmax_backward")
ELEMENTWISE = ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::gelu", "aten::tanh",
               "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg", "aten::native_layer_norm", "aten::exp",
               "silu_backward", "gelu_backward", "tanh_backward", "layer_norm_backward", "aten::sum",
               "aten::threshold_backward", "aten::where", "aten::log_softmax", "log_softmax_backward",
               "aten::sigmoid", "aten::clamp", "aten::maximum", "aten::minimum", "aten::masked_fill",
               "aten::addcmul", "aten::addcdiv", "aten::sqrt", "aten::lerp", "aten::rsub", "aten::fill_")
MOVEMENT = ("aten::copy_", "aten::cat", "aten::index", "aten::index_select", "aten::gather", "aten::scatter",
            "aten::embedding", "aten::clone", "aten::contiguous", "aten::zero_", "aten::empty", "aten::stack",
            "aten::_to_copy", "aten::index_put", "aten::embedding_dense_backward", "aten::nonzero",
            "aten::masked_select", "aten::repeat", "aten::narrow_copy", "aten::slice_backward",
            "aten::select_backward", "aten::unsqueeze", "aten::view", "aten::reshape", "aten::as_strided",
            "aten::expand", "aten::t", "aten::transpose", "aten::permute", "aten::slice", "aten::select")
OPTIMIZER = ("adam", "optimizer", "Optimizer", "_foreach")
CLASSES = ("matmul", "skinny matmul", "attention", "element-wise", "data movement", "optimizer", "other")


def classify(name: str, shapes: list) -> str:
    if any(key in name for key in OPTIMIZER):
        return "optimizer"
    if name in MATMULS or name in ("aten::matmul", "aten::linear"):
        dims = [d for shape in shapes if isinstance(shape, list) and len(shape) >= 2 for d in shape[-2:]]
        return "skinny matmul" if dims and min(dims) <= SKINNY else "matmul"
    if any(key in name for key in ATTENTION):
        return "attention"
    if name in ELEMENTWISE or any(name.startswith(key + "_") or name == key for key in ELEMENTWISE) \
            or name.endswith("_backward") and any(k in name for k in ("mul", "add", "silu", "gelu", "norm", "pow")):
        return "element-wise"
    if name in MOVEMENT or any(name == key + "_" for key in MOVEMENT):
        return "data movement"
    return "other"


def summarize(prof, steps: int) -> dict:
    """Per-class and top-operator self CPU time per optimizer step (ms)."""
    classes = {c: 0.0 for c in CLASSES}
    ops = []
    for ev in prof.key_averages(group_by_input_shape=True):
        self_us = float(ev.self_cpu_time_total)
        if self_us <= 0:
            continue
        shapes = [list(s) if isinstance(s, (list, tuple)) else s for s in (ev.input_shapes or [])]
        cls = classify(ev.key, shapes)
        classes[cls] += self_us
        ops.append({"op": ev.key, "shapes": shapes, "calls": ev.count / steps, "ms": self_us / 1000 / steps,
                    "class": cls})
    total = sum(classes.values())
    ops.sort(key=lambda o: -o["ms"])
    return {"steps": steps, "ms_per_step": total / 1000 / steps,
            "classes_ms": {c: v / 1000 / steps for c, v in classes.items()},
            "top": [{**o, "share": o["ms"] * steps * 1000 / total} for o in ops[:25]]}


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the profile's JSON file")
    parser.add_argument("--skip", type=int, default=3, help="optimizer steps before the profiler starts")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps profiled")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the child's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to profile")

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile

    state = {"n": 0, "prof": None, "done": False}
    out = Path(args.out)

    def hook(optimizer, *_):
        if state["done"]:
            return
        state["n"] += 1
        if state["n"] == args.skip:
            state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            state["prof"].start()
        elif state["prof"] is not None and state["n"] == args.skip + args.steps:
            state["prof"].stop()
            state["done"] = True
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"command": command, **summarize(state["prof"], args.steps)}, indent=1))

    register_optimizer_step_post_hook(hook)
    del torch
    if Path(command[0]).name.startswith("python"):  # `python script.py ...`: this interpreter runs the script
        command = command[1:]
    target = command[0]
    sys.argv = command
    if Path(target).name == "kilter":  # the console script: its entry point, in this process
        from kilter.cli import main
        code = main()
        return int(code or 0)
    runpy.run_path(target, run_name="__main__")
    return 0


def show(folder: Path) -> int:
    profiles = sorted(folder.glob("*.json"))
    if not profiles:
        print(f"no profiles in {folder}")
        return 1
    print("| run | ms per step | " + " | ".join(CLASSES) + " |")
    print("|---|---|" + "---|" * len(CLASSES))
    for path in profiles:
        p = json.loads(path.read_text())
        total = p["ms_per_step"]
        cells = [f"{p['classes_ms'][c]:.0f} ({100 * p['classes_ms'][c] / total:.0f}%)" for c in CLASSES]
        print(f"| {path.stem} | {total:.0f} | " + " | ".join(cells) + " |")
    for path in profiles:
        p = json.loads(path.read_text())
        print(f"\n{path.stem}: top operators (ms per step, calls per step, input shapes)")
        for o in p["top"][:12]:
            print(f"  {o['ms']:8.1f} ms {100 * o['share']:5.1f}%  x{o['calls']:<6.0f} {o['class']:<14} {o['op']} "
                  f"{o['shapes'][:3]}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--show"]:
        raise SystemExit(show(Path(sys.argv[2])))
    raise SystemExit(run(sys.argv[1:]))

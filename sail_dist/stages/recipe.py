"""The whole SAIL-VL2 recipe in one resumable command: `bash launch/recipe.sh RECIPE.yaml` (docs/recipe.md).

A recipe YAML lists stages in order, each with its config and overrides; every stage runs as its own launch
(`python -m sail_dist`, launch/gpu_sft.sh or launch/npu_pretrain.sh, so each gets a fresh process group) into
<out_dir>/NN_<stage>, initialised from the previous stage's HF export (`train.init_from=<prev>/hf`).

Resumable at two granularities: a finished stage leaves `stage_summary.json` and is skipped on a re-run; an
interrupted stage resumes from its own last checkpoint (the trainer's `train.resume=auto`). A failing stage stops
the recipe with its name, exit status and log file; the same command then picks up there. At the end (and after
each stage) `summary.md` / `summary.json` tabulate stage, steps, samples, final loss, eval figure and time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from sail_dist.config import ConfigError, build_dataclass

LAUNCHERS = {"python": [sys.executable, "-m", "sail_dist"], "gpu": ["bash", "launch/gpu_sft.sh"],
             "npu": ["bash", "launch/npu_pretrain.sh"]}


@dataclass
class RecipeStage:
    stage: str = ""  # a name of the stage registry (sail_dist/stages)
    config: str = ""  # this stage's config file (relative to the recipe); empty = the recipe's `config`
    overrides: list[str] = field(default_factory=list)  # dotted key=value, after the recipe's own


@dataclass
class Recipe:
    out_dir: str = "runs/recipe"
    config: str = ""  # the config every stage starts from (model, data, backend), relative to this file
    launcher: str = "python"  # python (one process) | gpu (launch/gpu_sft.sh) | npu (launch/npu_pretrain.sh)
    init_from: str = ""  # HF checkpoint the first stage starts from; empty = random init
    prepare: list[str] = field(default_factory=list)  # a command run once before the first stage (e.g. data prep)
    overrides: list[str] = field(default_factory=list)  # applied to every stage
    stages: list[RecipeStage] = field(default_factory=list)

    def check(self, err) -> None:
        from sail_dist.stages import available_stages

        if self.launcher not in LAUNCHERS:
            err("launcher", f"{self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if not self.stages:
            err("stages", "the recipe lists no stage")
        for i, s in enumerate(self.stages):
            if s.stage not in available_stages():
                import difflib

                close = difflib.get_close_matches(s.stage, available_stages(), n=1, cutoff=0.4)
                err(f"stages[{i}].stage", f"unknown stage {s.stage!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                           else f" (stages: {', '.join(available_stages())})"))


def load_recipe(path: str) -> Recipe:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    recipe = build_dataclass(Recipe, data, path)
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if not p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))  # noqa: E731
    recipe.config = resolve(recipe.config)
    for s in recipe.stages:
        s.config = resolve(s.config) or recipe.config
        if not s.config:
            raise ConfigError(f"{path}: stage {s.stage!r} has no config (give `config:` for the recipe or the stage)")
    return recipe


def stage_dir(recipe: Recipe, i: int, stage: RecipeStage) -> str:
    return os.path.join(recipe.out_dir, f"{i + 1:02d}_{stage.stage}")


def _samples(run_dir: str) -> int:
    total = 0
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                total += int(json.loads(line).get("data_samples", 0))
    except OSError:
        pass
    return total


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def run_stage(recipe: Recipe, i: int, stage: RecipeStage, init_from: str) -> tuple[int, dict]:
    """Launch one stage, streaming its output to the console and <dir>/stage.log; (exit status, summary)."""
    out = stage_dir(recipe, i, stage)
    os.makedirs(out, exist_ok=True)
    cmd = LAUNCHERS[recipe.launcher] + ["--stage", stage.stage, "--config", stage.config, *recipe.overrides,
                                        *stage.overrides, f"train.out_dir={out}"]
    if init_from:
        cmd.append(f"train.init_from={init_from}")
    t0 = time.perf_counter()
    lines = []
    with open(os.path.join(out, "stage.log"), "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        rc = proc.wait()
    summary = _last_json("".join(lines[-50:])) if rc == 0 else {}
    summary["wall_s"] = time.perf_counter() - t0
    return rc, summary


def _row(i: int, stage: RecipeStage, out: str, s: dict) -> dict:
    ev = s.get("eval") or {}
    return {"n": i + 1, "stage": stage.stage, "steps": s.get("steps"), "samples": s.get("rollouts") or _samples(out),
            "final_loss": s.get("final_loss"), "eval": ev.get("accuracy"), "time_s": s.get("wall_s"), "dir": out}


def write_summary(recipe: Recipe, rows: list[dict]) -> str:
    head = "| # | stage | steps | samples | final loss | eval | time |\n|---|---|---|---|---|---|---|\n"
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    body = "".join(f"| {r['n']} | {r['stage']} | {fmt(r['steps'], 'd')} | {r['samples']} | "
                   f"{fmt(r['final_loss'], '.4f')} | {fmt(r['eval'], '.3f')} | {fmt(r['time_s'], '.0f')} s |\n"
                   for r in rows)
    with open(os.path.join(recipe.out_dir, "summary.md"), "w") as f:
        f.write(head + body)
    with open(os.path.join(recipe.out_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return head + body


def run_recipe(recipe: Recipe) -> int:
    os.makedirs(recipe.out_dir, exist_ok=True)
    if recipe.prepare and not os.path.exists(os.path.join(recipe.out_dir, "PREPARED")):
        print(f"recipe: preparing: {' '.join(recipe.prepare)}", flush=True)
        subprocess.run(recipe.prepare, check=True)
        open(os.path.join(recipe.out_dir, "PREPARED"), "w").close()
    rows, init_from = [], recipe.init_from
    for i, stage in enumerate(recipe.stages):
        out = stage_dir(recipe, i, stage)
        done = os.path.join(out, "stage_summary.json")
        if os.path.exists(done):
            with open(done) as f:
                summary = json.load(f)
            print(f"recipe: stage {i + 1}/{len(recipe.stages)} {stage.stage}: done earlier ({done}), skipped",
                  flush=True)
        else:
            if init_from and not os.path.isfile(os.path.join(init_from, "config.json")):
                print(f"recipe: stage {i + 1}/{len(recipe.stages)} {stage.stage} starts from {init_from}, which holds "
                      "no HF export (config.json): the previous stage must export its model (train.export_hf=true; "
                      "remove its stage_summary.json to run it again), or set the recipe's init_from for the first "
                      "stage", file=sys.stderr, flush=True)
                return 2
            print(f"recipe: stage {i + 1}/{len(recipe.stages)} {stage.stage} -> {out}"
                  + (f" (from {init_from})" if init_from else ""), flush=True)
            rc, summary = run_stage(recipe, i, stage, init_from)
            if rc != 0:
                write_summary(recipe, rows)
                print(f"recipe: stage {i + 1}/{len(recipe.stages)} {stage.stage} failed (exit status {rc}); its "
                      f"log: {os.path.join(out, 'stage.log')}. Fix the cause and run the same command again: the "
                      f"{i} finished stage(s) are skipped and this one resumes from its last checkpoint.",
                      file=sys.stderr, flush=True)
                return rc
            with open(done + ".tmp", "w") as f:
                json.dump(summary, f, default=str)
            os.replace(done + ".tmp", done)
        rows.append(_row(i, stage, out, summary))
        write_summary(recipe, rows)
        init_from = summary.get("hf_export") or os.path.join(out, "hf")
    print(write_summary(recipe, rows), flush=True)
    print(json.dumps({"recipe": recipe.out_dir, "stages": len(rows), "summary": os.path.join(recipe.out_dir,
                                                                                         "summary.md")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (configs/recipe/*.yaml)")
    p.add_argument("--out-dir", help="override the recipe's out_dir")
    args = p.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except (ConfigError, OSError) as e:
        print(f"recipe: {e}", file=sys.stderr)
        return 2
    if args.out_dir:
        recipe.out_dir = args.out_dir
    return run_recipe(recipe)


if __name__ == "__main__":
    sys.exit(main())

"""Stage registry and entrypoint: each stage's defaults sit under the user's config, refusals name the key and the
fix, batches in samples map onto packed steps, the recipe runner chains / skips / resumes stages, and a stage's
first steps agree on the two backends."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, child_env, require, torchrun_cmd
from sail_dist.config import ConfigError, load_config
from sail_dist.stages import STAGES, Stage, available_stages, get_stage

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")
DEMO_NPU = os.path.join(ROOT, "configs", "demo", "npu_tiny_moe.yaml")
RECIPE_STAGES = os.path.join(ROOT, "configs", "recipe", "demo_stages")
SUPERVISED = ["vit_warmup", "vit_align", "vit_world", "pretrain_basic", "pretrain_multitask", "sft_phase1",
              "sft_phase2", "sft_phase3", "sft_phase4", "longcot_sft", "think_fusion_sft"]


def _stage_config(name: str) -> str:
    return {"sft_phase4": os.path.join(RECIPE_STAGES, "video_mix.yaml"),
            "longcot_sft": os.path.join(RECIPE_STAGES, "longcot.yaml"),
            "think_fusion_sft": os.path.join(RECIPE_STAGES, "think_fusion.yaml")}.get(name, DEMO)


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _get(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


def test_registry_lists_the_recipe_in_order():
    assert available_stages()[:len(SUPERVISED)] == SUPERVISED
    for name in available_stages():
        assert get_stage(name).name == name and get_stage(name).summary


@pytest.mark.parametrize("name", SUPERVISED)
def test_stage_defaults_sit_under_the_users_config(name):
    """Every default of the stage is in the resolved config unless the user's YAML sets that key, which wins."""
    path = _stage_config(name)
    with open(path) as f:
        user = yaml.safe_load(f)
    user_keys = set(_leaves({k: v for k, v in user.items() if k != "base"}))
    if "base" in user:
        with open(os.path.join(os.path.dirname(path), user["base"])) as f:
            user_keys |= set(_leaves({k: v for k, v in yaml.safe_load(f).items() if k != "base"}))
    cfg = load_config(path, ["train.global_batch_samples=0"], stage=name)
    assert cfg.train.stage == name
    for key, value in _leaves(get_stage(name).defaults).items():
        if key in user_keys or key == "train.global_batch_samples":
            continue
        assert _get(cfg, key) == value, (name, key)
    assert cfg.train.lr == 2.0e-3  # demo.yaml's lr beats every stage's


def test_stage_behaviour_reaches_the_config():
    assert load_config(DEMO, stage="vit_warmup").train.train_modules == ["adapter"]
    assert load_config(DEMO, stage="vit_align").train.train_modules == ["vit", "adapter"]
    assert load_config(DEMO, stage="pretrain_basic").train.adalrs.enabled
    assert not load_config(DEMO, stage="pretrain_multitask").train.adalrs.enabled
    fusion = load_config(_stage_config("think_fusion_sft"), stage="think_fusion_sft")
    assert (fusion.train.objective, fusion.data.think_format) == ("think_fusion", "fusion")
    assert load_config(_stage_config("longcot_sft"), stage="longcot_sft").data.think_format == "longcot"
    # command line > YAML > stage
    assert load_config(DEMO, ["train.train_modules=[llm]"], stage="vit_warmup").train.train_modules == ["llm"]
    # train.stage in the overrides (or the YAML) is the same as --stage
    assert load_config(DEMO, ["train.stage=vit_align"]).train.train_modules == ["vit", "adapter"]


def test_unknown_stage_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown stage 'vit_wamup'; did you mean 'vit_warmup'\?"):
        load_config(DEMO, stage="vit_wamup")
    with pytest.raises(ConfigError, match="'train.stage'.*not a stage|unknown stage 'sft_phase9'"):
        load_config(DEMO, ["train.stage=sft_phase9"])
    r = subprocess.run([sys.executable, "-m", "sail_dist", "--stage", "longcot", "-c", DEMO], cwd=ROOT,
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("sail-train: unknown stage 'longcot'; did you mean "
                                                        "'longcot_sft'?")


def test_stage_and_train_stage_must_agree():
    with pytest.raises(ConfigError, match="--stage vit_align but config key 'train.stage'.*'vit_warmup'"):
        load_config(DEMO, ["train.stage=vit_warmup"], stage="vit_align")


def test_sft_phase4_refuses_a_mix_that_is_not_image_video_one_to_one():
    with pytest.raises(ConfigError, match="data.demo.*sft_phase4.*modality: image"):
        load_config(DEMO, stage="sft_phase4")
    mix = _stage_config("sft_phase4")
    with pytest.raises(ConfigError, match=r"data.sources\[1\].modality.*declare each source"):
        load_config(mix, ["data.sources=[{path: a.jsonl, modality: image}, {path: b.jsonl}]"], stage="sft_phase4")
    with pytest.raises(ConfigError, match="image sources' weights sum to 2 and the video sources' to 1"):
        load_config(mix, ["data.sources=[{path: a.jsonl, modality: image, weight: 2}, "
                          "{path: b.jsonl, modality: video}]"], stage="sft_phase4")
    cfg = load_config(mix, stage="sft_phase4")
    assert [s.modality for s in cfg.data.sources] == ["image", "video"]


def test_a_stage_refuses_a_backend_it_cannot_run_on():
    STAGES.register("gpu_only_test", Stage("gpu_only_test", "test stage", backends=("gpu",)))
    try:
        with pytest.raises(ConfigError, match="'backend.name'.*does not run on backend 'npu'.*backend.name=gpu"):
            load_config(DEMO, ["backend.name=npu"], stage="gpu_only_test")
        assert load_config(DEMO, stage="gpu_only_test").train.stage == "gpu_only_test"
    finally:
        STAGES._entries.pop("gpu_only_test")


def test_cli_lists_stages():
    r = subprocess.run([sys.executable, "-m", "sail_dist", "--list-stages"], cwd=ROOT, capture_output=True,
                       text=True, env=child_env())
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.strip().splitlines()]
    assert names[:len(SUPERVISED)] == SUPERVISED


# ------------------------------------------------------------------------------------- samples -> packed steps
def test_global_batch_samples_and_epochs_map_onto_packed_steps(tmp_path):
    from sail_dist.data.loader import build_loader
    from sail_dist.train.batch_plan import resolve_batch

    demo = ["data.demo_dir=" + str(tmp_path / "demo"), "data.num_workers=0"]
    cfg = load_config(DEMO, [*demo, "train.global_batch_samples=400", "train.epochs=2"])
    out, plan = resolve_batch(cfg, dp_size=2)
    assert plan.records == 2000
    assert out.train.micro_batches == round(400 / (2 * plan.samples_per_pack)) and out.train.micro_batches > 1
    assert out.train.steps == -(-2 * 2000 // int(plan.samples_per_step)) or \
        out.train.steps == int(-(-2 * 2000 / plan.samples_per_step))
    # the realised batches of the run's own loader: within a pack of the asked-for 400 samples
    with build_loader(out, dp_rank=0, dp_size=2) as loader:
        realised = [next(loader).stats.samples for _ in range(4)]
    assert all(abs(n - 400) <= plan.samples_per_pack * 2 for n in realised), realised
    assert resolve_batch(load_config(DEMO, demo), 2) == (load_config(DEMO, demo), None)


# ------------------------------------------------------------------------------------------------ the recipe
def _write_recipe(path, demo_dir, stages):
    path.write_text(yaml.safe_dump({
        "out_dir": str(path.parent / "recipe"), "config": DEMO, "launcher": "python",
        "overrides": [f"data.demo_dir={demo_dir}", "train.eval_samples=0", "train.global_batch_samples=0",
                      "train.log_every=1", "data.num_workers=0", "model.llm.num_layers=1", "model.vit.num_layers=1"],
        "stages": stages}))


@pytest.mark.slow
def test_recipe_chains_stages_stops_at_a_failure_and_resumes_there(tmp_path):
    require("deepspeed")
    from sail_dist.data.demo import ensure_demo

    demo = str(tmp_path / "demo")
    ensure_demo(demo)
    recipe = tmp_path / "r.yaml"
    good = {"stage": "sft_phase1", "overrides": ["train.steps=2"]}
    _write_recipe(recipe, demo, [{"stage": "vit_warmup", "overrides": ["train.steps=2"]},
                                 {"stage": "sft_phase1", "overrides": ["train.steps=2", "train.lr=-1"]}])
    run = lambda: subprocess.run(["bash", os.path.join(ROOT, "launch", "recipe.sh"), str(recipe)], cwd=ROOT,  # noqa
                                 capture_output=True, text=True, env=child_env(), timeout=900)
    r = run()
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 2/2 sft_phase1 failed (exit status 2)" in r.stderr and "02_sft_phase1/stage.log" in r.stderr
    out = tmp_path / "recipe"
    assert (out / "01_vit_warmup" / "stage_summary.json").exists()
    assert not (out / "02_sft_phase1" / "stage_summary.json").exists()

    _write_recipe(recipe, demo, [{"stage": "vit_warmup", "overrides": ["train.steps=2"]}, good])
    r = run()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "stage 1/2 vit_warmup: done earlier" in r.stdout
    saved = yaml.safe_load((out / "02_sft_phase1" / "config.yaml").read_text())
    assert saved["train"]["init_from"] == str(out / "01_vit_warmup" / "hf")
    assert saved["train"]["stage"] == "sft_phase1"
    assert saved["train"]["train_modules"] == ["vit", "adapter", "llm"]
    rows = json.loads((out / "summary.json").read_text())
    assert [(r["stage"], r["steps"]) for r in rows] == [("vit_warmup", 2), ("sft_phase1", 2)]
    assert all(r["samples"] > 0 and r["final_loss"] is not None for r in rows)
    assert "| 2 | sft_phase1 | 2 |" in (out / "summary.md").read_text()


def test_recipe_refuses_an_unknown_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    _write_recipe(recipe, str(tmp_path / "demo"), [{"stage": "sft_phase5"}])
    r = subprocess.run([sys.executable, "-m", "sail_dist.stages.recipe", str(recipe)], cwd=ROOT,
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 2 and "stages[0].stage" in r.stderr and "did you mean 'sft_phase" in r.stderr


# ------------------------------------------------------------------------------------------ backend parity
@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_warmup", "vit_align", "think_fusion_sft"])
def test_stage_first_steps_agree_on_both_backends(tmp_path, name):
    """`launch/parity.sh --stage NAME`'s comparison with one rank per backend: 2 steps, loss and every gradient
    tensor within 1e-5 (fp32, CPU)."""
    require("deepspeed", "megatron.core")
    from sail_dist.data.demo import ensure_demo
    from sail_dist.data.demo_recipe import prepare

    demo = str(tmp_path / "demo")
    ensure_demo(demo)
    config = DEMO_NPU
    extra = []
    if name == "think_fusion_sft":
        data = prepare(str(tmp_path / "recipe_data"), demo)
        extra = ["data.demo=false", f"data.tokenizer={demo}/tokenizer",
                 f"data.sources=[{{path: {data}/direct.jsonl, weight: 0.9}}, {{path: {data}/think.jsonl, weight: 0.1}}]"]
    common = ["train.steps=2", "train.precision=fp32", "train.eval_samples=0", f"data.demo_dir={demo}",
              "data.demo=true", f"train.stage={name}", "train.global_batch_samples=0", "train.lr=1e-3",
              "train.warmup_steps=0", *extra]
    outs = {}
    for backend in ("gpu", "npu"):
        outs[backend] = str(tmp_path / f"{backend}.json")
        r = subprocess.run(torchrun_cmd(1, "-m", "sail_dist.bench.parity", "run", outs[backend], config, *common,
                                        f"backend.name={backend}", f"train.out_dir={tmp_path / backend}", "parallel.pp=1",
                                        "parallel.ep=1", "parallel.vpp=1"),
                           cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "sail_dist.bench.parity", "compare", outs["gpu"], outs["npu"]],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and summary["ok"], r.stdout[-3000:]
    assert summary["max_loss_rel"] <= 1e-5 and summary["max_grad_rel"] <= 1e-5


@pytest.mark.slow
def test_parity_stages_sh_adalrs_rollback_and_video_mix_agree(tmp_path):
    """`launch/parity_stages.sh 3 pretrain_basic sft_phase4`: the user's sweep over stages, on two of them that the
    one-rank test above does not cover: pretrain_basic's AdaLRS (window 3 over 9 steps: a trial, then its decision,
    taken identically on both backends, and the steps after the rollback within 1e-5) and sft_phase4's image:video
    1:1 mix (videos through the ViT), ZeRO-2 DP 2 vs PP 2 x EP 2 x DP 2."""
    require("deepspeed", "megatron.core")
    out = tmp_path / "out"
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "parity_stages.sh"), "3", "pretrain_basic", "sft_phase4"],
                       cwd=ROOT, env=child_env(OUT_DIR=str(out), DEMO_DIR=str(tmp_path / "demo"),
                                               RECIPE_DATA=str(tmp_path / "recipe_data")),
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["all_ok"] and set(last["stages"]) == {"pretrain_basic", "sft_phase4"}
    assert last["stages"]["pretrain_basic"]["steps"] == 9
    basic = json.loads((out / "pretrain_basic.out").read_text().strip().splitlines()[-1])
    assert basic["adalrs_decisions"]["gpu"] and basic["adalrs_decisions"]["gpu"] == basic["adalrs_decisions"]["npu"]


@pytest.mark.parametrize("name", ["demo", "sailvl2_2b", "sailvl2_a3b"])
def test_shipped_recipes_parse(name):
    from sail_dist.stages.recipe import load_recipe

    recipe = load_recipe(os.path.join(ROOT, "configs", "recipe", f"{name}.yaml"))
    stages = [s.stage for s in recipe.stages]
    assert stages[:len(SUPERVISED) - 2] == [s for s in SUPERVISED if s in stages][:len(SUPERVISED) - 2]
    assert all(os.path.isfile(s.config) for s in recipe.stages)
    if name != "demo":
        assert {"rl_verifiable", "rl_mixed"} <= set(stages)


def test_demo_recipe_sources_load_from_a_relative_directory(tmp_path, monkeypatch):
    """The derived sources (configs/recipe/demo.yaml names them by a relative path) decode, video records included."""
    from sail_dist.data.demo import ensure_demo
    from sail_dist.data.demo_recipe import prepare
    from sail_dist.data.loader import build_loader

    ensure_demo(str(tmp_path / "demo"))
    monkeypatch.chdir(tmp_path)
    prepare("recipe_data", str(tmp_path / "demo"))
    cfg = load_config(os.path.join(RECIPE_STAGES, "video_mix.yaml"), [
        f"data.tokenizer={tmp_path}/demo/tokenizer", "data.num_workers=0", "data.pack_tokens=1024",
        "data.sources=[{path: recipe_data/image.jsonl, modality: image}, {path: recipe_data/video.jsonl, modality: video}]"],
        stage="sft_phase4")
    with build_loader(cfg) as loader:
        step = next(loader)
    assert step.stats.modality_samples.get("video", 0) > 0 and not step.stats.decode_dropped
    assert sum(mb.num_images for mb in step.micro_batches) > 0


def test_demo_recipe_rl_stages_load_their_prompts(tmp_path, monkeypatch):
    """The demo recipe's RL stages (configs/recipe/demo_stages/rl.yaml): the prompts demo_recipe writes load as
    verifiable prompts with ground truth, and each stage resolves its loss and reward parts (rl_mixed adds think)."""
    from sail_dist.data.demo import ensure_demo
    from sail_dist.data.demo_recipe import prepare
    from sail_dist.data.samples import SampleBuilder
    from sail_dist.rl.prompts import load_prompts

    ensure_demo(str(tmp_path / "demo"))
    monkeypatch.chdir(tmp_path)
    prepare("recipe_data", str(tmp_path / "demo"))
    over = [f"data.tokenizer={tmp_path}/demo/tokenizer", "rl.prompts=[{path: recipe_data/rl_train.jsonl}]",
            "rl.eval_prompts=[{path: recipe_data/rl_eval.jsonl}]", f"data.demo_dir={tmp_path}/demo"]
    for stage, parts in (("rl_verifiable", {"answer", "format"}), ("rl_mixed", {"answer", "format", "think"})):
        cfg = load_config(os.path.join(RECIPE_STAGES, "rl.yaml"), over, stage=stage)
        assert cfg.train.stage == stage and cfg.train.objective == "dapo" and cfg.train.export_hf
        assert set(cfg.rl.reward.weights) == parts
    items, bad = load_prompts(cfg, cfg.rl.eval_prompts, SampleBuilder.from_config(cfg, f"{tmp_path}/demo/tokenizer"))
    assert len(items) == 100 and bad.total == 0 and all(it.answer in {"1", "2", "3", "4", "5"} for it in items)
    recipe = yaml.safe_load(open(os.path.join(ROOT, "configs", "recipe", "demo.yaml")))
    order = [s["stage"] for s in recipe["stages"]]
    assert order.index("longcot_sft") < order.index("rl_verifiable") < order.index("think_fusion_sft") \
        < order.index("rl_mixed")

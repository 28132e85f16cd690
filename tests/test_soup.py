"""`sail-soup`: the soup is the element-wise (weighted) mean in fp32 cast back, in the inputs' HF layout; each
refusal names its reason; it loads through `train.init_from` and trains on; peak memory is about two fp32 copies
of the largest tensor, not N models."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, free_port, require
from sail_dist.config import dump_config, load_config
from sail_dist.kernels import get_opset
from sail_dist.model import hf
from sail_dist.model.build import build_model
from sail_dist.model.soup import SoupError, main, make_soup

DEMO = os.path.join(ROOT, "configs", "demo", "demo.yaml")


def _cfg(*overrides: str):
    return load_config(DEMO, ["train.eval_samples=0", *overrides])


def _model(seed: int):
    return build_model(_cfg().model, get_opset("reference"), seed=seed)


def _run(root, name: str, model, init_from: str, seed: int = 1234, dtype=torch.bfloat16) -> str:
    """A run directory as the trainer leaves it: config.yaml (its train.init_from) and the hf/ export."""
    run = os.path.join(root, name)
    os.makedirs(run)
    dump_config(_cfg(f"train.init_from={init_from}", f"train.seed={seed}", f"train.out_dir={run}"),
                os.path.join(run, "config.yaml"))
    hf.save_sailvl(model, os.path.join(run, "hf"), dtype=dtype)
    return run


def _sibling(base_model, seed: int, scale: float = 1e-3):
    """A stand-in for a fine-tune of `base_model`: its weights plus small seeded noise (the trainer is too slow
    here to train several; the trains-on test below uses it for real)."""
    m = _model(1)
    m.load_state_dict(base_model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.detach().abs().mean() + 1e-3))
    return m


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base export and three sibling runs started from it (bf16 exports, as the trainer writes)."""
    root = str(tmp_path_factory.mktemp("soup"))
    base = _model(1)
    base_dir = os.path.join(root, "base")
    hf.save_sailvl(base, base_dir)
    runs = [_run(root, f"sib{i}", _sibling(base, 10 + i), base_dir) for i in range(3)]
    return root, base, base_dir, runs


def _tensors(d: str) -> dict[str, torch.Tensor]:
    return hf.read_tensors(d)


def test_soup_is_the_weighted_mean_in_fp32_then_cast(family, tmp_path):
    _, _, _, runs = family
    xs = [_tensors(os.path.join(r, "hf")) for r in runs]
    # two inputs, equal weights: (a + b) / 2 of bf16 values is exact in fp32, so the cast result is exact
    out2 = str(tmp_path / "s2")
    make_soup(runs[:2], out2)
    s2 = _tensors(out2)
    assert set(s2) == set(xs[0])
    for k, t in s2.items():
        assert t.dtype == xs[0][k].dtype == torch.bfloat16
        assert torch.equal(t, ((xs[0][k].double() + xs[1][k].double()) / 2).to(torch.bfloat16)), k
    # three inputs, weights 1:2:1 (normalised): within one bf16 rounding of the float64 mean, almost all exact
    out3 = str(tmp_path / "s3")
    prov = make_soup(runs, out3, weights=[1, 2, 1])
    assert prov["weights"] == [0.25, 0.5, 0.25]
    s3 = _tensors(out3)
    exact = total = 0
    for k, t in s3.items():
        ref = sum(w * x[k].double() for w, x in zip(prov["weights"], xs))
        ulp = ref.abs().clamp_min(1e-30) * 2.0 ** -7
        assert bool(((t.double() - ref).abs() <= ulp).all()), k
        exact += int((t == ref.to(torch.bfloat16)).sum())
        total += t.numel()
    assert exact / total > 0.999
    # the layout of the inputs: same files, config.json copied, soup.json provenance
    assert sorted(os.listdir(out3)) == ["config.json", "model.safetensors", "soup.json"]
    assert open(os.path.join(out3, "config.json")).read() == open(os.path.join(runs[0], "hf", "config.json")).read()
    assert [i["lineage"] for i in prov["inputs"]] == [prov["lineage"]] * 3
    assert json.load(open(os.path.join(out3, "soup.json")))["lineage"].startswith("init_from ")


def test_fp32_exports_average_in_fp32(family, tmp_path):
    root, base, base_dir, _ = family
    runs = [_run(str(tmp_path), f"f{i}", _sibling(base, 20 + i), base_dir, dtype=torch.float32) for i in range(3)]
    prov = make_soup(runs, str(tmp_path / "s"), weights=[0.2, 0.3, 0.5])
    xs = [_tensors(os.path.join(r, "hf")) for r in runs]
    for k, t in _tensors(str(tmp_path / "s")).items():
        ref = sum(w * x[k].double() for w, x in zip(prov["weights"], xs))
        assert t.dtype == torch.float32
        assert float((t.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max()) + 1e-12, k
    # the distance printed is ||x_i - x_0|| / ||x_0|| over all tensors (float64 reference)
    num = sum(float((xs[1][k].double() - xs[0][k].double()).square().sum()) for k in xs[0])
    den = sum(float(xs[0][k].double().square().sum()) for k in xs[0])
    assert prov["inputs"][1]["distance_to_first"] == pytest.approx(math.sqrt(num / den), rel=1e-5)


def _edit_config(hf_dir: str, **llm) -> None:
    p = os.path.join(hf_dir, "config.json")
    d = json.load(open(p))
    d["llm_config"].update(llm)
    json.dump(d, open(p, "w"))


def test_each_refusal_names_its_reason(family, tmp_path):
    root, base, base_dir, runs = family
    t = str(tmp_path)

    def refused(inputs, match, force_ok: bool):
        with pytest.raises(SoupError, match=match):
            make_soup(inputs, os.path.join(t, "out"))
        if force_ok:
            warnings = []
            make_soup(inputs, os.path.join(t, "forced"), force=True, warn=warnings.append)
            assert any(w.startswith("--force: ") for w in warnings)
            import shutil

            shutil.rmtree(os.path.join(t, "forced"))
        else:
            with pytest.raises(SoupError, match="cannot average"):
                make_soup(inputs, os.path.join(t, "forced"), force=True)
        assert not os.path.exists(os.path.join(t, "out")) and not os.path.exists(os.path.join(t, "out.tmp"))

    # different config (which key)
    cfg_run = _run(t, "cfg", _sibling(base, 30), base_dir)
    _edit_config(os.path.join(cfg_run, "hf"), rope_theta=123.0)
    refused([runs[0], cfg_run], r"different config: .* llm_config\.rope_theta: 10000\.0 vs 123\.0", True)
    # tensor names (which) and shapes (which): --force cannot help
    x = _tensors(os.path.join(runs[1], "hf"))
    names_dir = os.path.join(t, "names")
    hf.write_tensors({k: v for k, v in x.items() if k != "mlp1.0.bias"}, names_dir)
    os.link(os.path.join(runs[1], "hf", "config.json"), os.path.join(names_dir, "config.json"))
    refused([runs[0], names_dir], r"different tensor names: .* lacks 1 .*'mlp1\.0\.bias'", False)
    shapes_dir = os.path.join(t, "shapes")
    hf.write_tensors({**x, "mlp1.0.bias": x["mlp1.0.bias"][:-1]}, shapes_dir)
    os.link(os.path.join(runs[1], "hf", "config.json"), os.path.join(shapes_dir, "config.json"))
    n = x["mlp1.0.bias"].numel()
    refused([runs[0], shapes_dir], rf"different tensor shapes: .*mlp1\.0\.bias \[{n - 1}\] vs \[{n}\]", False)
    # dtype (which); --force casts to the first input's dtype
    fp32 = _run(t, "fp32", _sibling(base, 31), base_dir, dtype=torch.float32)
    refused([runs[0], fp32], r"dtype mismatch: .* F32 vs BF16", True)
    # lineage: another train.init_from
    other = _run(t, "other", _sibling(base, 32), os.path.join(t, "elsewhere"))
    refused([runs[0], other], r"different lineage: .*init_from .*base.*init_from .*elsewhere", True)
    # relative distance: an independent init recorded with the same lineage (0.58 on the tiny model)
    far = _run(t, "far", _model(2), base_dir)
    refused([runs[0], far], r"relative distance .* above --max-distance=0\.3 .*far: 0\.5[0-9]+ \(furthest tensor", True)
    # a bare HF directory: no lineage to check -> a warning, not a refusal
    warnings = []
    make_soup([runs[0], os.path.join(runs[1], "hf")], os.path.join(t, "bare"), warn=warnings.append)
    bare = os.path.join(t, "bare_copy")
    os.makedirs(bare)
    for f in os.listdir(os.path.join(runs[2], "hf")):
        os.link(os.path.join(runs[2], "hf", f), os.path.join(bare, f))
    warnings = []
    make_soup([runs[0], bare], os.path.join(t, "bare_soup"), warn=warnings.append)
    assert any("lineage cannot be checked for " + bare in w for w in warnings)
    # a soup carries its lineage in soup.json: a soup of soups is checked
    prov = make_soup([os.path.join(t, "bare"), runs[2]], os.path.join(t, "soup2"))
    assert prov["lineage"] == f"init_from {os.path.realpath(base_dir)}"
    # the CLI: exit 2 and the reason on stderr
    assert main([runs[0], other, "--out", os.path.join(t, "cli")]) == 2


def test_distances_of_siblings_and_independent_inits(family, tmp_path):
    """The default threshold's reasoning, measured: siblings are close, independent inits are far."""
    _, _, base_dir, runs = family
    prov = make_soup(runs[:2], str(tmp_path / "near"))
    assert prov["inputs"][1]["distance_to_first"] < 0.01
    far = _run(str(tmp_path), "far", _model(3), base_dir)
    prov = make_soup([runs[0], far], str(tmp_path / "far_soup"), force=True)
    # 0.58: the identical RMSNorm weights (ones) carry much of the tiny model's norm; random matrices alone: sqrt(2)
    assert 0.5 < prov["inputs"][1]["distance_to_first"] < 1.5


def test_soup_loads_via_init_from_and_trains_on(family, tmp_path, monkeypatch):
    require("deepspeed")
    _, _, _, runs = family
    soup = str(tmp_path / "soup")
    make_soup(runs[:2], soup)
    model = build_model(_cfg().model, get_opset("reference"), init_from=soup)  # what train.init_from does
    exported = hf.export_by_rules(model, hf.sailvl_rules(model.cfg), torch.bfloat16)
    souped = _tensors(soup)
    assert all(torch.equal(exported[k], souped[k]) for k in exported)
    from sail_dist.train.trainer import train

    # The GPU stays visible (on a GPU machine the run trains there): hiding it from a process whose CUDA is already
    # initialised would hide it from DeepSpeed's accelerator only.
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    from sail_dist.data.demo import ensure_demo

    demo = ensure_demo(str(tmp_path / "demo"), n_train=60, n_eval=4)  # the demo's data, small: quicker to make
    out = str(tmp_path / "run")
    cfg = _cfg(f"train.init_from={soup}", f"train.out_dir={out}", "train.steps=2", "train.save_every=0",
               "data.pack_tokens=512", "data.num_workers=0", "train.tensorboard=false", "data.demo=false",
               f"data.sources=[{{path: {demo.train}}}]", f"data.tokenizer={demo.tokenizer}", "backend.name=gpu")
    summary = train(cfg)
    assert summary["complete"] and math.isfinite(summary["first_loss"]) and math.isfinite(summary["final_loss"])
    trained = _tensors(summary["hf_export"])
    assert any(not torch.equal(trained[k], souped[k]) for k in souped)  # it trained on from the soup
    assert summary["final_loss"] < summary["first_loss"] + 0.5


def test_peak_memory_is_about_two_fp32_copies_of_the_largest_tensor(tmp_path):
    """Three inputs of 24 MiB (bf16) each, largest tensor 4M elements (16 MiB in fp32): the soup's peak RSS
    above the resident size of the same process just before it (a child process; Linux only)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(3):
        d = str(tmp_path / f"in{i}")
        g.manual_seed(0)  # the same base for every input, plus a little noise of each input's own
        base = {"big": torch.randn(2048, 2048, generator=g), **{f"t{j}": torch.randn(1024, 1024, generator=g)
                                                                  for j in range(8)}}
        g.manual_seed(100 + i)
        tensors = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}
        hf.write_tensors(tensors, d)
        json.dump({"model_type": "sailvl"}, open(os.path.join(d, "config.json"), "w"))
        dirs.append(d)
    # peak RSS of the soup above the process's resident size just before it: Linux's VmHWM, reset through
    # /proc/self/clear_refs ("5") after the imports and the indexing of the inputs
    code = ("import json, re, sys; from sail_dist.model.soup import make_soup, resolve_input; "
            "[resolve_input(d) for d in sys.argv[2:]]; "
            "kib = lambda key: int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "before = kib('VmRSS'); open('/proc/self/clear_refs', 'w').write('5'); "
            "make_soup(sys.argv[2:], sys.argv[1]); print(json.dumps([before, kib('VmHWM')]))")
    # a fixed mmap threshold: glibc then returns every freed large block at once, so RSS follows live memory (with
    # its default, adaptive threshold, freed blocks may stay resident: allocator slack, not data the soup holds)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out"), *dirs], capture_output=True, text=True,
                       env=child_env(MALLOC_MMAP_THRESHOLD_="131072"), timeout=300)
    assert r.returncode == 0, r.stderr
    before, hwm = json.loads(r.stdout.strip().splitlines()[-1])
    peak = (hwm - before) * 1024
    largest_fp32 = 2048 * 2048 * 4
    one_model_bf16 = (2048 * 2048 + 8 * 1024 * 1024) * 2
    print(f"soup peak above baseline: {peak / 2 ** 20:.1f} MiB; largest tensor fp32 {largest_fp32 / 2 ** 20:.0f} MiB; "
          f"inputs {3 * one_model_bf16 / 2 ** 20:.0f} MiB (bf16)")
    # two fp32 buffers of the largest tensor + a constant (read / norm chunks, first-use runtime allocations): not
    # three models (measured on the 2-core CPU box: 40.5 MiB = 2 x 16 MiB + 8.5 MiB)
    assert peak < 2 * largest_fp32 + 12 * 2 ** 20
    s = _tensors(str(tmp_path / "out"))
    xs = [_tensors(d) for d in dirs]
    ref = sum(x["big"].double() for x in xs) / 3
    assert float((s["big"].double() - ref).abs().max()) <= float(ref.abs().max()) * 2 ** -7

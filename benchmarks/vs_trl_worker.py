"""The TRL half of `vs_trl.py` and `real_model.py --trl`; runs in TRL's own virtual environment, never in ours.

    /tmp/trl-venv/bin/python benchmarks/vs_trl_worker.py SPEC.json OUT.json

SPEC.json names the mode ("dpo", "rloo" or "grpo"), the saved model folder
(its tokenizer beside it), the data file, the batch shape, the step counts,
the torch threads and, for RLOO and GRPO, the path of a task module of
`rlhf_ray/data/` (loaded on its own: it needs only the standard library) and
the name of its rule reward (`reward_fn`, default `mention_reward`), the same
reward as ours. With `eval` (held-out prompts, every how many steps, new
tokens), the model answers the held-out prompts greedily at step 0 and every
`every` steps, scored by the same rule; the time that takes is left out of
the step times. OUT.json gets the wall time of every optimizer step (from the
end of one to the end of the next, data loading and generation included), the
evaluations, when the first step ended (epoch seconds: the launcher's time to
first step), and TRL's own versions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time


def text_of(value) -> str:
    """A prompt or completion as text: conversational ones (lists of messages) joined by their contents."""
    if isinstance(value, str):
        return value
    return "\n".join(message["content"] for message in value)


def load_reward(path: str, name: str = "mention_reward"):
    spec = importlib.util.spec_from_file_location("task_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    rule = getattr(module, name)

    def reward(prompts, completions, **_):
        return rule([text_of(p) for p in prompts], [text_of(c) for c in completions])

    reward.__name__ = name
    return reward


def held_out_pass_rate(model, tokenizer, prompts: list, rule, max_new_tokens: int, batch_size: int = 16) -> float:
    """Share of held-out prompts whose greedy answer the rule scores 1 (chat template, left padding)."""
    import torch

    tokenizer.padding_side = "left"
    right = 0
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 if not isinstance(p, str) else p for p in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(r == 1.0 for r in rule([text_of(p) for p in batch], answers))
    model.train()
    return right / len(prompts)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    steps: list[float] = []
    first_step_end = [None]  # epoch seconds when the first optimizer step ended (time to first step)
    evals: list[dict] = []
    mark = [0.0]  # when the step under way started: the last step's end, or the last evaluation's
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    rule = load_reward(spec["reward_module"], spec.get("reward_fn", "mention_reward"))
    held_out = spec.get("eval")
    if held_out:
        eval_prompts = [json.loads(line)["prompt"] for line in open(held_out["prompts"])]

    def evaluate(step: int) -> None:
        rate = held_out_pass_rate(model, tokenizer, eval_prompts, rule, held_out["max_new_tokens"])
        evals.append({"step": step, "minutes": sum(steps) / 60, "pass_rate": rate})
        print(f"step {step}: held-out greedy pass rate {100 * rate:.1f}% after {sum(steps) / 60:.1f} min",
              flush=True)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if held_out:
                evaluate(0)
            mark[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - mark[0])
            first_step_end[0] = first_step_end[0] or time.time()
            if held_out and state.global_step % held_out["every"] == 0:
                evaluate(state.global_step)
            mark[0] = time.perf_counter()

    data = load_dataset("json", data_files=spec["data"], split="train")
    common = dict(output_dir=spec["out_dir"], max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"],
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=spec.get("adam_beta2", 0.95), weight_decay=0.0,
                  # TRL's defaults differ from plain Trainer's: fp32 (or, asked for, bf16 autocast over fp32
                  # weights) and no recomputation, as ours.
                  bf16=bool(spec.get("bf16")), fp16=False, gradient_checkpointing=False)
    if spec["mode"] == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(per_device_train_batch_size=spec["micro_batch_size"],
                         gradient_accumulation_steps=spec["batch_size"] // spec["micro_batch_size"],
                         max_length=spec["max_length"], beta=spec["beta"], **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[StepClock()])
    else:
        if spec["mode"] == "rloo":
            from trl import RLOOConfig as Config
            from trl import RLOOTrainer as Trainer
        else:
            from trl import GRPOConfig as Config
            from trl import GRPOTrainer as Trainer

        rows = spec["batch_size"] * spec["samples_per_prompt"]
        # One optimizer step per batch of prompts x samples, the KL to the reference on (TRL's GRPO
        # default is beta 0, no reference model: equal work needs ours).
        args = Config(per_device_train_batch_size=rows, gradient_accumulation_steps=1,
                      num_generations=spec["samples_per_prompt"], max_completion_length=spec["max_new_tokens"],
                      temperature=1.0, top_p=1.0, top_k=0, beta=spec["kl_coef"], num_iterations=1, **common)
        trainer = Trainer(model=model, reward_funcs=rule, args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    versions = {name: importlib.metadata.version(name) for name in ("trl", "transformers", "torch", "accelerate")}
    with open(sys.argv[2], "w") as handle:
        json.dump({"step_seconds": steps, "evals": evals, "versions": versions, "threads": torch.get_num_threads(),
                   "first_step_end_epoch": first_step_end[0]}, handle)


if __name__ == "__main__":
    main()

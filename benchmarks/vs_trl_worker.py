"""The TRL half of `vs_trl.py`; runs in TRL's own virtual environment, never in ours.

    /tmp/trl-venv/bin/python benchmarks/vs_trl_worker.py SPEC.json OUT.json

SPEC.json names the mode ("dpo", "rloo" or "grpo"), the saved model folder
(its tokenizer beside it), the data file, the batch shape, the step counts,
the torch threads and, for RLOO and GRPO, the path of
`rlhf_ray/data/synthetic.py` (loaded on its own: it needs only the standard
library) for the same rule reward as ours. OUT.json gets the wall time of
every optimizer step (from the end of one to the end of the next, data
loading and generation included) and TRL's own versions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import time


def load_reward(path: str):
    spec = importlib.util.spec_from_file_location("synthetic_task", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)

    def mention_reward(prompts, completions, **_):
        return module.mention_reward(list(prompts), list(completions))

    return mention_reward


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    data = load_dataset("json", data_files=spec["data"], split="train")
    common = dict(output_dir=spec["out_dir"], max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"],
                  lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
                  report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                  max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0,
                  # TRL's defaults differ from plain Trainer's: fp32 and no recomputation, as ours.
                  bf16=False, fp16=False, gradient_checkpointing=False)
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
        trainer = Trainer(model=model, reward_funcs=load_reward(spec["reward_module"]), args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    versions = {name: importlib.metadata.version(name) for name in ("trl", "transformers", "torch", "accelerate")}
    with open(sys.argv[2], "w") as handle:
        json.dump({"step_seconds": steps, "versions": versions, "threads": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    main()

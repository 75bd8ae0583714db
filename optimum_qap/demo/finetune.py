"""LoRA fine-tuning of a (qap-)quantized demo model on the shapes-VQA training split, with transformers' `Trainer`.

Batches are `optimum_qap.demo.train.make_batch`'s (prompt + " answer </s>", loss on the answer and </s> only), on
fresh training-split examples (no example is seen twice). The model trains as it will run: a qap model keeps its
pruner, so the adapters learn to answer from the visual tokens it keeps. Needs PEFT (``pip install
'optimum-qap[train]'``). `examples/lora_results.py` measures what it recovers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

from .data import make_example, split_seeds
from .train import make_batch

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass(frozen=True)
class LoraRun:
    """Settings of one LoRA run (``steps`` x ``batch_size`` distinct training examples)."""

    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 2e-3
    rank: int = 8
    seed: int = 0
    target_modules: str | tuple[str, ...] = "all-linear"


class TrainingSplit(torch.utils.data.Dataset):
    """The first ``count`` training-split examples, generated when read."""

    def __init__(self, count: int):
        self.seeds = split_seeds(count, "train")

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int):
        return make_example(self.seeds[index])


class AnswerBatches:
    """Data collator: `make_batch` without the vision-training targets the language model has no use for."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        batch = make_batch(examples, self.tokenizer)
        return {name: batch[name] for name in MODEL_INPUTS}


def lora_finetune(model: nn.Module, processor, run: LoraRun = LoraRun()) -> tuple[PeftModel, list[dict]]:
    """Attach a LoRA adapter to ``model`` (rank ``run.rank``, alpha 2 x rank), train it, and return the PeftModel
    (in eval mode) with the Trainer's log history (a progress bar shows the steps)."""
    set_seed(run.seed)  # the adapter's initial A matrices come from the global generator
    peft_model = get_peft_model(model, LoraConfig(r=run.rank, lora_alpha=2 * run.rank,
                                                  target_modules=_targets(run.target_modules)))
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder, max_steps=run.steps, per_device_train_batch_size=run.batch_size,
            learning_rate=run.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, run.steps // 20),
            seed=run.seed, data_seed=run.seed, logging_steps=max(1, run.steps // 10), save_strategy="no",
            report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for host-to-GPU copies
        )
        trainer = Trainer(model=peft_model, args=args, train_dataset=TrainingSplit(run.steps * run.batch_size),
                          data_collator=AnswerBatches(processor.tokenizer))
        trainer.train()
    return peft_model.eval(), trainer.state.log_history


def _targets(target_modules: str | tuple[str, ...]) -> str | list[str]:
    return target_modules if isinstance(target_modules, str) else list(target_modules)

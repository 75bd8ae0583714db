"""Train the small LLaVA-format demo model on the shapes-VQA task, from scratch, on CPU.

    python -m optimum_qap.demo.train --output optimum_qap/demo/model --steps 1500 \
        --max-minutes 40 --threads 1

Model: ``LlavaForConditionalGeneration`` = CLIP-style vision tower (224 px, patch 14 ->
256 patches + [CLS]) -> 2-layer GELU MLP projector -> small Llama decoder with the demo
word-level vocabulary; ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"``.

Losses (training only; the auxiliary heads are not saved):

* answer loss: next-token cross-entropy on the answer word and ``</s>`` only;
* [CLS] loss: a linear head on the layer -2 [CLS] state classifies the content of each of
  the four slots (empty or one of 12 shape x colour classes). Under the "default" strategy
  [CLS] never reaches the LLM, so without this its attention map would be meaningless;
* patch loss: linear heads on the layer -2 patch states predict the shape and the colour of
  the object covering each patch (or background). This dense signal makes the vision
  features local and linearly readable, which is what makes the task learnable in minutes.

The training forward runs the vision tower up to the feature layer only (the last CLIP layer
feeds nothing under ``vision_feature_layer=-2``; it keeps its initial weights), then the
projector and the language model exactly as ``LlavaModel.forward`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from .data import (
    COLOR_NAMES,
    GRID,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPES,
    SLOT_NAMES,
    make_dataset,
    make_example,
    patch_labels,
    slot_labels,
    split_seeds,
)
from .tokenizer import CLIP_MEAN, CLIP_STD, build_processor

N_IMAGE_TOKENS = (IMAGE_SIZE // 14) ** 2
N_SLOT_CLASSES = 1 + len(SHAPES) * len(COLOR_NAMES)


def build_config(tokenizer, args) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_hidden // 32,
        image_size=IMAGE_SIZE,
        patch_size=14,
        num_channels=3,
        projection_dim=args.vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.text_hidden,
        intermediate_size=args.text_intermediate,
        num_hidden_layers=args.text_layers,
        num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=N_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )


class AuxHeads(nn.Module):
    """Training-only heads on the vision tower's feature layer (not saved)."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls_norm = nn.LayerNorm(dim)
        self.cls_head = nn.Linear(dim, len(SLOT_NAMES) * N_SLOT_CLASSES)
        self.patch_norm = nn.LayerNorm(dim)
        self.patch_shape = nn.Linear(dim, 1 + len(SHAPES))
        self.patch_color = nn.Linear(dim, 1 + len(COLOR_NAMES))
        self.patch_pos = nn.Linear(dim, 2 * GRID)  # row and column of the patch


_MEAN = np.array(CLIP_MEAN, dtype=np.float32)
_STD = np.array(CLIP_STD, dtype=np.float32)


def pixel_values(images) -> torch.Tensor:
    """Same values as the shipped CLIPImageProcessor for 224x224 RGB inputs (no resize needed)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - _MEAN) / _STD
    return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())


def make_batch(examples, tokenizer, with_answers: bool = True) -> dict:
    """Right-padded training batch: prompt (image expanded) + " answer </s>"; labels on answer + eos."""
    image_tok = "<image>"
    ids, labels = [], []
    for e in examples:
        prompt_ids = tokenizer(e.prompt.replace(image_tok, image_tok * N_IMAGE_TOKENS))["input_ids"]
        if with_answers:
            ans = tokenizer(e.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            ans = []
        ids.append(prompt_ids + ans)
        labels.append([-100] * len(prompt_ids) + ans)
    L = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
    attn = torch.zeros((len(ids), L), dtype=torch.long)
    lab = torch.full((len(ids), L), -100, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attn[i, : len(x)] = 1
        lab[i, : len(y)] = torch.tensor(y)
    out = {
        "input_ids": input_ids,
        "attention_mask": attn,
        "labels": lab,
        "pixel_values": pixel_values([e.image for e in examples]),
    }
    sl, cl = zip(*(patch_labels(e) for e in examples), strict=True)
    out["patch_shape"] = torch.from_numpy(np.stack(sl))
    out["patch_color"] = torch.from_numpy(np.stack(cl))
    out["slots"] = torch.from_numpy(np.stack([slot_labels(e) for e in examples]))
    return out


def vision_features(model: LlavaForConditionalGeneration, pv: torch.Tensor) -> torch.Tensor:
    """hidden_states[vision_feature_layer] of the vision tower, computing only the layers needed."""
    vt = model.model.vision_tower
    layer = model.config.vision_feature_layer
    n_layers = len(vt.encoder.layers)
    upto = n_layers + 1 + layer if layer < 0 else layer  # number of encoder layers to run
    x = vt.pre_layrnorm(vt.embeddings(pv))
    for blk in vt.encoder.layers[:upto]:
        x = blk(x, None)
        if isinstance(x, tuple):
            x = x[0]
    return x


def forward_losses(model, aux: AuxHeads, batch: dict, answer_only_logits: bool = True) -> dict:
    feats = vision_features(model, batch["pixel_values"])  # (B, 257, Dv)
    cls, patches = feats[:, 0], feats[:, 1:]
    image_embeds = model.model.multi_modal_projector(patches)  # (B, 256, D)
    ids = batch["input_ids"]
    emb = model.model.language_model.embed_tokens(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(mask, image_embeds.reshape(-1, image_embeds.shape[-1]).to(emb.dtype))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
    # next-token prediction at positions whose *next* label is supervised
    labels = batch["labels"]
    tgt = labels[:, 1:]
    sel = tgt != -100
    logits = model.lm_head(h[:, :-1][sel])
    ans_loss = F.cross_entropy(logits.float(), tgt[sel])
    out = {"answer": ans_loss, "logits": logits, "targets": tgt[sel]}

    B = cls.shape[0]
    slot_logits = aux.cls_head(aux.cls_norm(cls)).view(B, len(SLOT_NAMES), N_SLOT_CLASSES)
    out["cls"] = F.cross_entropy(slot_logits.float().reshape(-1, N_SLOT_CLASSES), batch["slots"].reshape(-1))
    p = aux.patch_norm(patches)
    out["patch"] = F.cross_entropy(
        aux.patch_shape(p).float().reshape(-1, 1 + len(SHAPES)), batch["patch_shape"].reshape(-1)
    ) + F.cross_entropy(aux.patch_color(p).float().reshape(-1, 1 + len(COLOR_NAMES)), batch["patch_color"].reshape(-1))
    # position of each patch: RoPE only acts on q.k, so the value a patch hands to the LLM carries its
    # location only if the vision features do; this target keeps it there (needed for "where" and counting)
    pos = aux.patch_pos(p).float()
    idx = torch.arange(GRID * GRID, device=pos.device)
    out["patch"] = out["patch"] + 0.5 * (
        F.cross_entropy(pos[..., :GRID].reshape(-1, GRID), (idx // GRID).repeat(B))
        + F.cross_entropy(pos[..., GRID:].reshape(-1, GRID), (idx % GRID).repeat(B))
    )
    return out


@torch.no_grad()
def quick_accuracy(model, aux, examples, tokenizer, batch_size: int = 50, autocast: bool = False) -> dict:
    """Teacher-forced argmax of the answer token (one forward per batch; fast proxy of generate)."""
    model.eval()
    hits = {qt: [] for qt in QUESTION_TYPES}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = make_batch(chunk, tokenizer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = forward_losses(model, aux, batch)
        pred = out["logits"].argmax(-1).view(len(chunk), 2)[:, 0]
        tgt = out["targets"].view(len(chunk), 2)[:, 0]
        for e, ok in zip(chunk, (pred == tgt).tolist(), strict=True):
            hits[e.qtype].append(ok)
    model.train()
    per = {qt: (sum(v) / len(v) if v else float("nan")) for qt, v in hits.items()}
    allh = [x for v in hits.values() for x in v]
    return {"overall": sum(allh) / len(allh), **per}


def lr_at(progress: float, base: float, warmup_frac: float, min_ratio: float = 0.05) -> float:
    if progress < warmup_frac:
        return base * max(progress / warmup_frac, 0.01)
    t = (progress - warmup_frac) / max(1e-8, 1 - warmup_frac)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train the optimum_qap shapes-VQA demo LLaVA model")
    ap.add_argument("--output", default="optimum_qap/demo/model")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument(
        "--max-minutes", type=float, default=40.0, help="time budget; LR schedule follows max(step, time) progress"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of progress")
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16-autocast", action="store_true", help="CPU bf16 autocast (weights stay fp32)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--vision-hidden", type=int, default=128)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-hidden", type=int, default=256)
    ap.add_argument("--text-intermediate", type=int, default=768)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--text-heads", type=int, default=8)
    ap.add_argument("--log", default=None, help="JSON-lines log file (default: <output>/training_log.jsonl)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--init-from", default=None, help="start from a saved checkpoint instead of random init")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    processor = build_processor()
    tok = processor.tokenizer
    if args.init_from:  # continue training a saved checkpoint (aux heads start fresh)
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from, dtype=torch.float32)
        config = model.config
    else:
        config = build_config(tok, args)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    aux = AuxHeads(config.vision_config.hidden_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model params: {n_params / 1e6:.2f} M (+ aux {sum(p.numel() for p in aux.parameters()) / 1e3:.1f} k)")

    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    val = make_dataset(args.eval_n, "val")
    os.makedirs(args.output, exist_ok=True)
    log_path = args.log or os.path.join(args.output, "training_log.jsonl")
    with open(log_path, "w") as logf:
        train_seeds = split_seeds(args.steps * args.batch_size, "train", start=args.seed * args.steps * args.batch_size)
        budget = args.max_minutes * 60
        t0 = time.time()
        model.train()
        ema = None
        step = 0
        pbar = tqdm(total=args.steps, desc="train", mininterval=10)
        for step in range(1, args.steps + 1):
            elapsed = time.time() - t0
            progress = max((step - 1) / args.steps, elapsed / budget)
            if progress >= 1.0:
                print(f"time budget reached at step {step - 1}")
                step -= 1
                break
            lr = lr_at(progress, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            seeds = train_seeds[(step - 1) * args.batch_size : step * args.batch_size]
            batch = make_batch([make_example(s) for s in seeds], tok)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
                out = forward_losses(model, aux, batch)
            loss = out["answer"] + args.aux_weight * (out["cls"] + out["patch"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            cur = {k: out[k].item() for k in ("answer", "cls", "patch")}
            ema = cur if ema is None else {k: 0.95 * ema[k] + 0.05 * cur[k] for k in cur}
            pbar.update(1)
            pbar.set_postfix(
                ans=f"{ema['answer']:.3f}",
                cls=f"{ema['cls']:.3f}",
                patch=f"{ema['patch']:.3f}",
                lr=f"{lr:.1e}",
                refresh=False,
            )
            rec = {
                "step": step,
                "time_s": round(time.time() - t0, 1),
                "lr": lr,
                **{k: round(v, 4) for k, v in cur.items()},
            }
            if step % args.eval_every == 0:
                acc = quick_accuracy(model, aux, val, tok, autocast=args.bf16_autocast)
                rec["val"] = {k: round(v, 3) for k, v in acc.items()}
                tqdm.write(f"step {step} t={rec['time_s']}s loss(ema) {ema} val {rec['val']}")
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        pbar.close()
        train_time = time.time() - t0
        acc = quick_accuracy(model, aux, val, tok, autocast=args.bf16_autocast)
        summary = {"steps": step, "train_seconds": round(train_time, 1), "val_teacher_forced": acc, "args": vars(args)}
        print(json.dumps(summary, indent=2))
        logf.write(json.dumps({"summary": summary}) + "\n")
    if not args.no_save:
        model.save_pretrained(args.output)
        processor.save_pretrained(args.output)
        print(f"saved to {args.output}")


if __name__ == "__main__":
    main()

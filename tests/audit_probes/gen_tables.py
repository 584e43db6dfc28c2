import sys
from pathlib import Path
A = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
def load(f):
    out = {}
    if not (A / f).exists():
        return out
    for line in (A / f).read_text().splitlines():
        parts = line.split("\t")
        out[parts[0]] = "\t".join(parts[1:])
    return out
def esc(s):
    s = s.replace("|", "\\|").replace("\t", " — ").strip()
    import re
    s = re.sub(r"/tmp/[\w./-]*?(probe|pcli)-\w+", "TMP", s)
    return s[:160]
EXPECT = {
 "config lora_alpha=inf": "ConfigError", "config orth_reg_weight=inf": "ConfigError",
 "get_model r=100000 (capacity 200000 on 32-wide)": "ConfigError before allocation",
 "get_model r=20 capacity 40 > 32": "ConfigError", "get_model lora r=33 > 32": "ConfigError",
 "target_modules Conv2d named": "TargetModuleError", "target_modules typo entry": "TargetModuleError",
 "step after zero_grad (no grads), 18 steps": "0 rank events + warning",
 "step with zeroed grads (set_to_none=False), 18 steps": "0 rank events + warning",
 "step after weights became inf": "TrainingDivergedError",
 "save_pretrained into existing file": "OutputPathError, file kept",
 "save_pretrained into dir with user file": "user file kept", "export_peft into dir with user file": "user file kept",
 "save_pretrained dir mode (umask 022)": "0o755 (umask)",
 "save_pretrained through symlink to dir": "write through the link",
 "save with NaN adapter weights": "refused", "export_peft with NaN weights": "refused",
 "load_checkpoint wrong optimizer -> handle unchanged?": "error, step_count unchanged (0)",
 "merge_and_unload then unmerge": "clear RuntimeError", "merge_and_unload then export_peft": "export (factors intact)",
 "interrupted swap, then load": "restored", "load_adapter onto other model, same shapes": "AdapterLoadError",
 "load_adapter onto bf16 copy of the base": "loads", "load_adapter leftover tensor": "AdapterLoadError",
 "load_adapter path is a file": "AdapterLoadError", "save_checkpoint/load_checkpoint round trip": "loads",
 "merge twice then unmerge (idempotent)": "ok", "load_adapter hand-edited: in_features changed": "AdapterLoadError",
 "load_adapter hand-edited: format version 99": "AdapterLoadError (upgrade)",
}
def rows(before, after, default):
    b, a = load(before), load(after)
    out = []
    for k in b:
        exp = EXPECT.get(k, default(k))
        out.append(f"| {esc(k)} | {exp} | {esc(b[k])} | {esc(a.get(k, '?'))} |")
    return out
def api_default(k):
    if k.startswith("load_adapter hand-edited") or k.startswith("load_adapter") or k.startswith("load_checkpoint"):
        return "AdapterLoadError, model untouched"
    if k.startswith("config") or k.startswith("adalora"):
        return "ConfigError"
    return "clear error or correct result"
print("## Further cases: the Python API and the files it reads and writes\n")
print("Run by `probe.py` (kept with the audit notes; every line below is its output, before = the unfixed")
print("`main` tree, after = this branch; paths shortened to TMP). Cases whose before and after agree already held.\n")
print("| case | expected | observed before | after |\n|---|---|---|---|")
print("\n".join(rows("before.tsv", "after.tsv", api_default)))
print()
print("## Further cases: the command line\n")
print("Run in-process with `main([...])` on the real MiniLM model and the GLUE RTE files (`probe_cli.py`);")
print("`rc` is the exit code, the last column the error line printed.\n")
print("| case | expected | observed before | after |\n|---|---|---|---|")
print("\n".join(rows("cli_before.tsv", "cli_after.tsv",
                    lambda k: "exit 2, one line" if k != "no command" else "help, exit 2")))

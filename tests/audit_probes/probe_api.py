"""Run hostile cases against whichever elalora is on PYTHONPATH; print one line per case."""
import json, os, sys, tempfile, warnings, shutil
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (conftest)
import torch
torch.set_num_threads(1)
import elalora  # noqa: E402
from conftest import tiny_bert, tiny_llama  # noqa: E402
warnings.simplefilter("ignore")
T = Path(tempfile.mkdtemp(prefix="probe-"))
R = []

def case(name):
    def deco(fn):
        try:
            out = fn()
            R.append((name, "ok" + (f": {out}" if out is not None else "")))
        except BaseException as e:
            R.append((name, f"{type(e).__name__}: {' '.join(str(e).split())[:110]}"))
        return fn
    return deco

def H(**kw):
    cfg = dict(r=2, b=1, modules_to_save=["classifier"], total_steps=20, tinit=2, tfinal=2, delta_t=2); cfg.update(kw)
    return elalora.get_model(tiny_bert(), elalora.ElaLoRAConfig(**cfg))

C = elalora.ElaLoRAConfig
@case("config r=0")
def _(): C(r=0)
@case("config r=2.5")
def _(): C(r=2.5)
@case("config r=True")
def _(): C(r=True)
@case("config r='8'")
def _(): C(r="8")
@case("config lora_alpha=nan")
def _(): C(r=2, lora_alpha=float("nan"))
@case("config lora_alpha=inf")
def _(): C(r=2, lora_alpha=float("inf"))
@case("config lora_dropout=1.0")
def _(): C(r=2, lora_dropout=1.0)
@case("config beta1=nan")
def _(): C(r=2, beta1=float("nan"))
@case("config orth_reg_weight=inf")
def _(): C(r=2, orth_reg_weight=float("inf"))
@case("config tinit=-1")
def _(): C(r=2, tinit=-1)
@case("config delta_t=0")
def _(): C(r=2, delta_t=0)
@case("config tinit=nan")
def _(): C(r=2, tinit=float("nan"))
@case("config total_steps=0")
def _(): C(r=2, total_steps=0)
@case("config min_rank > r")
def _(): C(r=2, min_rank=3)
@case("config max_rank < r")
def _(): C(r=4, max_rank=2)
@case("config target_modules=[] ")
def _(): C(r=2, target_modules=[])
@case("config target_modules bad regex")
def _(): C(r=2, target_modules="(")
@case("config seed=1.5")
def _(): C(r=2, seed=1.5)
@case("adalora init_r < r")
def _(): elalora.AdaLoRAConfig(r=4, init_r=2)
@case("get_model(non-module)")
def _(): elalora.get_model("bert", C(r=2))
@case("get_model twice")
def _():
    m = tiny_bert(); elalora.get_model(m, C(r=2, b=1)); elalora.get_model(m, C(r=2, b=1))
@case("get_model r=100000 (capacity 200000 on 32-wide)")
def _(): elalora.get_model(tiny_bert(), C(r=100000, b=1))
@case("get_model r=20 capacity 40 > 32")
def _(): elalora.get_model(tiny_bert(), C(r=20, b=1))
@case("get_model lora r=33 > 32")
def _(): elalora.get_model(tiny_bert(), elalora.FixedRankConfig(r=33))
@case("target_modules Conv2d named")
def _():
    class N(torch.nn.Module):
        def __init__(s):
            super().__init__(); s.conv = torch.nn.Conv2d(1, 2, 3)
            s.fc = torch.nn.Linear(4, 4); s.fc2 = torch.nn.Linear(4, 2)
    return elalora.get_model(N(), elalora.FixedRankConfig(r=2, target_modules=["conv", "fc", "fc2"])).names
@case("target_modules typo entry")
def _(): return elalora.get_model(tiny_bert(), C(r=2, b=1, target_modules=["query", "valeu"])).names
@case("target_modules regex matching nothing")
def _(): elalora.get_model(tiny_bert(), C(r=2, b=1, target_modules=r"nothing\.here"))
@case("modules_to_save unknown")
def _(): elalora.get_model(tiny_bert(), C(r=2, b=1, modules_to_save=["nohead"]))
@case("rank_pattern unknown module")
def _(): elalora.get_model(tiny_bert(), C(r=2, b=1, rank_pattern={"x": 2}))
@case("b too large for pool")
def _(): C(r=2, b=100).check_pool(12)
@case("step without total_steps")
def _():
    h = elalora.get_model(tiny_bert(), C(r=2, b=1)); h.step()
@case("step after zero_grad (no grads), 18 steps")
def _():
    h = H(); h.model.train()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=0.0)
    for t in range(18):
        x = torch.randint(0, 100, (4, 8)); h.model(input_ids=x, labels=(x[:, 0] > 50).long()).loss.backward()
        opt.step(); opt.zero_grad(); h.step(opt)
    return f"{len(h.events)} rank events"
@case("step with zeroed grads (set_to_none=False), 18 steps")
def _():
    h = H(); h.model.train()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=0.0)
    for t in range(18):
        x = torch.randint(0, 100, (4, 8)); h.model(input_ids=x, labels=(x[:, 0] > 50).long()).loss.backward()
        opt.step(); opt.zero_grad(set_to_none=False); h.step(opt)
    return f"{len(h.events)} rank events"
@case("step after weights became inf")
def _():
    h = H(); h.model.train()
    opt = torch.optim.SGD([p for p in h.model.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad(): h.adapters[0].lora_Q.add_(float("inf"))
    x = torch.randint(0, 100, (4, 8)); h.model(input_ids=x, labels=(x[:, 0] > 50).long()).loss.backward()
    opt.step(); h.step(opt)
@case("save_pretrained into existing file")
def _():
    f = T / "afile"; f.write_text("x"); H().save_pretrained(f); return f"file is_dir={f.is_dir()}"
@case("save_pretrained into dir with user file")
def _():
    d = T / "userdir"; d.mkdir(); (d / "notes.txt").write_text("mine"); H().save_pretrained(d)
    return f"notes.txt kept={(d / 'notes.txt').exists()}"
@case("export_peft into dir with user file")
def _():
    d = T / "userdir2"; d.mkdir(); (d / "notes.txt").write_text("mine"); H().export_peft(d)
    return f"notes.txt kept={(d / 'notes.txt').exists()}"
@case("save_pretrained dir mode (umask 022)")
def _():
    H().save_pretrained(T / "modes"); return oct((T / "modes").stat().st_mode & 0o777)
@case("save_pretrained through symlink to dir")
def _():
    (T / "real").mkdir(); os.symlink(T / "real", T / "link"); H().save_pretrained(T / "link")
    return f"link kept={(T / 'link').is_symlink()}, real has config={(T / 'real' / 'adapter_config.json').exists()}"
@case("save with NaN adapter weights")
def _():
    h = H()
    with torch.no_grad(): h.adapters[0].lora_P.fill_(float("nan"))
    h.save_pretrained(T / "nan"); return "saved"
@case("export_peft with NaN weights")
def _():
    h = H()
    with torch.no_grad(): h.adapters[0].lora_P.fill_(float("nan"))
    h.export_peft(T / "nanpeft"); return "exported"
@case("save_checkpoint/load_checkpoint round trip")
def _():
    h = H(); elalora.save_checkpoint(T / "ck.pt", h); elalora.load_checkpoint(T / "ck.pt", H())
@case("load_checkpoint truncated")
def _():
    h = H(); elalora.save_checkpoint(T / "ck2.pt", h)
    b = (T / "ck2.pt").read_bytes(); (T / "ck2.pt").write_bytes(b[:len(b)//2])
    elalora.load_checkpoint(T / "ck2.pt", H())
@case("load_checkpoint wrong optimizer -> handle unchanged?")
def _():
    h = H(); opt = torch.optim.AdamW([p for p in h.model.parameters() if p.requires_grad])
    h.step_count = 7; elalora.save_checkpoint(T / "ck3.pt", h, opt)
    h2 = H(); ps = [p for p in h2.model.parameters() if p.requires_grad]
    o2 = torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}])
    try:
        elalora.load_checkpoint(T / "ck3.pt", h2, o2)
    except Exception as e:
        return f"{type(e).__name__}; step_count after failed load = {h2.step_count}"
@case("load_checkpoint of another layout")
def _():
    h = H(); elalora.save_checkpoint(T / "ck4.pt", h)
    elalora.load_checkpoint(T / "ck4.pt", elalora.get_model(tiny_bert(), C(r=3, b=1, total_steps=20)))
@case("load_checkpoint not a checkpoint (random bytes)")
def _():
    (T / "junk.pt").write_bytes(os.urandom(100)); elalora.load_checkpoint(T / "junk.pt", H())
SAVED = T / "saved"
H().save_pretrained(SAVED)
def edited(fn, name):
    d = T / name; shutil.copytree(SAVED, d); c = json.loads((d / "adapter_config.json").read_text()); fn(c)
    (d / "adapter_config.json").write_text(json.dumps(c)); return d
def first(c):
    return c["modules"][next(iter(c["modules"]))]
for nm, fn in [("capacity 10**7", lambda c: first(c).update(capacity=10**7)),
               ("rank > capacity", lambda c: first(c).update(rank=first(c)["capacity"] + 1)),
               ("negative rank", lambda c: first(c).update(rank=-1)),
               ("missing 'kind'", lambda c: first(c).pop("kind")),
               ("scaling 'big'", lambda c: first(c).update(scaling="big")),
               ("scaling NaN", lambda c: first(c).update(scaling=float("nan"))),
               ("one module entry removed", lambda c: c["modules"].pop(next(iter(c["modules"])))),
               ("in_features changed", lambda c: first(c).update(in_features=31)),
               ("config.b = 'four'", lambda c: c["config"].update(b="four")),
               ("events malformed", lambda c: c.update(events=[{"step": 1}])),
               ("format version 99", lambda c: c.update(elalora_format_version=99)),
               ("method unknown", lambda c: c["config"].update(method="dora")),
               ("step_count -5", lambda c: c.update(step_count=-5))]:
    d = edited(fn, "ed_" + str(abs(hash(nm))))
    case(f"load_adapter hand-edited: {nm}")(lambda d=d: elalora.load_adapter(tiny_bert(), d) and None)
@case("load_adapter onto other model, same shapes")
def _(): elalora.load_adapter(tiny_bert(seed=1), SAVED)
@case("load_adapter onto bf16 copy of the base")
def _(): elalora.load_adapter(tiny_bert().to(torch.bfloat16), SAVED)
@case("load_adapter onto llama")
def _(): elalora.load_adapter(tiny_llama(), SAVED)
@case("load_adapter onto already-adapted model")
def _():
    m = tiny_bert(); elalora.get_model(m, C(r=2, b=1)); elalora.load_adapter(m, SAVED)
@case("load_adapter truncated weights")
def _():
    d = T / "trunc"; shutil.copytree(SAVED, d)
    f = d / "adapter_model.safetensors"; f.write_bytes(f.read_bytes()[:-50])
    elalora.load_adapter(tiny_bert(), d)
@case("load_adapter empty weights file")
def _():
    d = T / "empty"; shutil.copytree(SAVED, d); (d / "adapter_model.safetensors").write_bytes(b"")
    elalora.load_adapter(tiny_bert(), d)
@case("load_adapter config is a JSON list")
def _():
    d = T / "list"; shutil.copytree(SAVED, d); (d / "adapter_config.json").write_text("[1]")
    elalora.load_adapter(tiny_bert(), d)
@case("load_adapter config binary garbage")
def _():
    d = T / "garb"; shutil.copytree(SAVED, d); (d / "adapter_config.json").write_bytes(os.urandom(64))
    elalora.load_adapter(tiny_bert(), d)
@case("load_adapter leftover tensor")
def _():
    from safetensors.torch import load_file, save_file
    d = T / "left"; shutil.copytree(SAVED, d); f = d / "adapter_model.safetensors"; t = load_file(f)
    t["extra.lora_Q"] = torch.zeros(2, 2); save_file(t, f); elalora.load_adapter(tiny_bert(), d)
@case("load_adapter missing dir")
def _(): elalora.load_adapter(tiny_bert(), T / "nope")
@case("load_adapter path is a file")
def _(): elalora.load_adapter(tiny_bert(), T / "afile")
@case("load_adapter PEFT dir")
def _():
    H().export_peft(T / "peftdir"); elalora.load_adapter(tiny_bert(), T / "peftdir")
@case("merge_and_unload then unmerge")
def _():
    h = H(); h.merge_and_unload(); h.unmerge()
@case("merge_and_unload then export_peft")
def _():
    h = H(); h.merge_and_unload(); h.export_peft(T / "afterunload"); return "exported"
@case("merge twice then unmerge (idempotent)")
def _():
    h = H(); h.merge(); h.merge(); h.unmerge()
@case("export_peft all ranks 0")
def _():
    h = H()
    for a in h.adapters: a.deactivate(a.active_indices().tolist())
    h.export_peft(T / "allzero")
@case("interrupted swap, then load")
def _():
    import elalora.persistence as P
    h = H(); h.save_pretrained(T / "swap"); real = os.replace; n = [0]
    def rep(a, b):
        n[0] += 1
        if n[0] == 2: raise KeyboardInterrupt
        return real(a, b)
    P.os.replace = rep
    try:
        h.save_pretrained(T / "swap")
    except KeyboardInterrupt:
        pass
    finally:
        P.os.replace = real
    try:
        elalora.load_adapter(tiny_bert(), T / "swap"); return "loaded (restored)"
    except Exception as e:
        return (f"{type(e).__name__}: {str(e)[:60]}; "
                f"hidden: {[p.name[:12] for p in T.iterdir() if p.name.startswith('.swap')]}")
for n, v in R:
    print(f"{n}\t{v}")

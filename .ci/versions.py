"""Print the versions that decide whether the suite passes (used by .ci/run and .ci/latest)."""
import importlib.metadata as md
import platform

names = ["torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "bitsandbytes", "trl"]
parts = [f"python {platform.python_version()}"]
for n in names:
    try:
        parts.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        parts.append(f"{n} (not installed)")
print("versions: " + ", ".join(parts))

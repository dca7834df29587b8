"""The OCI layout of the test images, for the benchmarks' --fixtures default: what
scripts/test-images.sh prints (HOIST_FIXTURES, else ../shared/fixtures/oci, else the images it
builds once and caches; building needs root)."""
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts/test-images.sh"
HELP = "OCI layout of the test images (default: what scripts/test-images.sh prints)"


def test_images():
    out = subprocess.run(["bash", str(SCRIPT)], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"no test images: {SCRIPT} failed (see above); or pass --fixtures DIR")
    return out.stdout.strip().splitlines()[-1]

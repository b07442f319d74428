"""S3 pull throughput as a ratio against ``aws s3 sync``, measured in one run.

    python benchmarks/data_s3_pull.py [--images 5000] [--workers 16] [--aws PATH]

Starts ``moto_server`` on 127.0.0.1, uploads N small PNGs under ``s3://bench/set/<class>/``,
then downloads the prefix twice into fresh folders: once with the S3 source's mirror
(:func:`transferlab.data.s3.sync_prefix`, what the pull stage runs before checking images) and
once with ``aws s3 sync``. Goal: puller / aws <= 1.0. The second, no-change pull of each is timed
too. awscli pins its own botocore; if it clashes with ours, install it apart:
``python -m venv /tmp/awscli && /tmp/awscli/bin/pip install awscli`` and pass
``--aws /tmp/awscli/bin/aws``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.helpers import png_bytes  # noqa: E402
from tests.integration.moto import CREDENTIALS, MotoServer  # noqa: E402
from transferlab.config import S3Source  # noqa: E402
from transferlab.data.s3 import sync_prefix  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; best of each")
    ap.add_argument("--aws", default=shutil.which("aws") or "/tmp/awscli/bin/aws")
    args = ap.parse_args()
    os.environ.update(CREDENTIALS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = MotoServer(tmp)
        try:
            s3 = server.client()
            s3.create_bucket(Bucket="bench")
            bodies = {
                f"set/c{i % 10}/{i:05d}.png": png_bytes(i, size=32) for i in range(args.images)
            }
            with ThreadPoolExecutor(16) as pool:
                list(
                    pool.map(
                        lambda kv: s3.put_object(Bucket="bench", Key=kv[0], Body=kv[1]),
                        bodies.items(),
                    )
                )
            env = {
                **os.environ,
                "AWS_CONFIG_FILE": str(tmp / "none"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none"),
            }
            ours_t, aws_t = [], []
            # Alternate which goes first, and keep each side's best round: the server warms
            # up and the shared machine's load drifts.
            for r in range(args.rounds):
                source = S3Source(
                    url="s3://bench/set",
                    endpoint_url=server.url,
                    path=tmp / f"ours{r}",
                    workers=args.workers,
                )
                dest = str(tmp / f"aws{r}")
                cmd = [args.aws, "s3", "sync", "--quiet", "--endpoint-url", server.url]
                cmd += ["s3://bench/set", dest]
                sides = [
                    (ours_t, lambda source=source: sync_prefix(source)),
                    (aws_t, lambda cmd=cmd: subprocess.run(cmd, check=True, env=env)),
                ]
                for times, fn in sides if r % 2 == 0 else sides[::-1]:
                    times.append(timed(fn))
            ours, aws = min(ours_t), min(aws_t)
            ours_again = timed(lambda: sync_prefix(source))
            aws_again = timed(lambda: subprocess.run(cmd, check=True, env=env))
            n_ours = sum(1 for p in (tmp / "ours0").rglob("*.png"))
            n_aws = sum(1 for p in (tmp / "aws0").rglob("*.png"))
            assert n_ours == n_aws == args.images, (n_ours, n_aws)
        finally:
            server.stop()
    version = subprocess.run([args.aws, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{args.images} PNGs (32x32) from moto_server on 127.0.0.1; aws: {version}")
    print(f"  rounds: puller {[round(t, 1) for t in ours_t]}, aws {[round(t, 1) for t in aws_t]}")
    print(f"  puller ({args.workers} threads): {ours:6.2f} s  ({args.images / ours:7.0f} obj/s)")
    print(f"  aws s3 sync:                {aws:6.2f} s  ({args.images / aws:7.0f} obj/s)")
    print(f"  ratio puller / aws:         {ours / aws:6.2f}  (goal <= 1.0)")
    print(f"  unchanged second pull: puller {ours_again:.2f} s, aws {aws_again:.2f} s")


if __name__ == "__main__":
    main()

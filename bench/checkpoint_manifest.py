"""What the checkpoint manifest costs: CRC-32 of every file of a checkpoint (what a save adds before COMPLETE,
and what `--resume_from_checkpoint latest` reads again to verify), next to the time of writing the same
bytes, plus one ~1 GB file. Prints a table.

    python bench/checkpoint_manifest.py CHECKPOINT_FOLDER [--big_file_mb 1024] [--scratch /tmp]
"""
import argparse
import os
import sys
import tempfile
import time


def main(argv=None):
    from diffusers_npu import manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoint-N folder")
    p.add_argument("--big_file_mb", type=int, default=1024, help="size of the large file to hash (MiB); 0: skip")
    p.add_argument("--scratch", default=tempfile.gettempdir(), help="where the large file is written")
    a = p.parse_args(argv)
    rows = []
    files = manifest.listing(a.checkpoint)
    total = sum(size for _, size in files)
    t = time.perf_counter()
    for rel, _ in files:
        manifest.file_crc(os.path.join(a.checkpoint, rel))
    rows.append((f"CRC of {os.path.basename(a.checkpoint)} ({len(files)} files)", total, time.perf_counter() - t))
    if a.big_file_mb:
        path = os.path.join(a.scratch, f"manifest-bench-{os.getpid()}.bin")
        block = os.urandom(1 << 20)
        try:
            t = time.perf_counter()
            with open(path, "wb") as f:
                for _ in range(a.big_file_mb):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            rows.append(("write + fsync of the large file", a.big_file_mb << 20, time.perf_counter() - t))
            t = time.perf_counter()
            manifest.file_crc(path)
            rows.append(("CRC of the large file (page cache)", a.big_file_mb << 20, time.perf_counter() - t))
        finally:
            os.remove(path)
    print(f"{'what':<44} {'MB':>8} {'seconds':>8} {'MB/s':>8}")
    for what, n, sec in rows:
        print(f"{what:<44} {n / 1e6:>8.1f} {sec:>8.3f} {n / 1e6 / sec:>8.0f}")


if __name__ == "__main__":
    sys.exit(main())

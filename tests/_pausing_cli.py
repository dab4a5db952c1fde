"""``python tests/_pausing_cli.py POINT CONFIG [key=value ...]``: the real CLI, paused at POINT.

The kill tests send SIGKILL/SIGINT to this process while it sleeps at a chosen point of the
run, to check what an interrupted run leaves behind. It prints ``PAUSED <point>`` (flushed)
when it gets there. Points:

- ``stage:<name>``  at the start of a runner stage ("load data", "save", ...)
- ``weights-written``  inside save: model.safetensors written, quantization_config.json not yet
- ``reload``  inside the reload check, after the checkpoint was loaded back
- ``publish``  everything staged and checked, just before it is put in place
- ``swapped``  right after the new result was swapped in, before the old one is cleaned up
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def pause(point: str) -> None:
    print(f"PAUSED {point}", flush=True)
    time.sleep(120)


def install(point: str) -> None:
    import archquant.core.safe_io as safe_io
    import archquant.core.serialization as serialization
    import archquant.run as run

    if point.startswith("stage:"):
        original_stage = run.Timer.stage

        @contextmanager
        def stage(self, name, log=print):
            if name == point.removeprefix("stage:"):
                pause(point)
            with original_stage(self, name, log):
                yield

        run.Timer.stage = stage
    elif point == "weights-written":
        original_save_model = serialization.save_model

        def save_model(*args, **kwargs):
            original_save_model(*args, **kwargs)
            pause(point)

        serialization.save_model = save_model
    elif point == "reload":
        original_load = run.load_quantized

        def load_quantized(directory):
            model = original_load(directory)
            pause(point)
            return model

        run.load_quantized = load_quantized
    elif point == "publish":
        original_publish = safe_io.StagedDir.publish

        def publish(self):
            if self.what == "output_dir":
                pause(point)
            return original_publish(self)

        safe_io.StagedDir.publish = publish
    elif point == "swapped":
        original_exchange = safe_io._exchange

        def exchange(a, b):
            done = original_exchange(a, b)
            pause(point)
            return done

        safe_io._exchange = exchange
    else:
        raise SystemExit(f"unknown pause point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from archquant.run import main

    sys.exit(main(sys.argv[2:]))

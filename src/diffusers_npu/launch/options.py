"""The options of ``diffusers-npu launch`` / ``python -m diffusers_npu.launch``.

Launcher options are ModelZoo-style ``--key=value`` (``--key value`` works too); everything after the first
``--`` is passed to the training script untouched. Each ModelZoo option in :data:`MODELZOO_FLAGS` becomes the
training flag it names.
"""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

from ..cliutil import nonneg_int, positive_int
from .variants import SD3_TABLE, TABLE

VARIANTS = sorted(list(TABLE) + list(SD3_TABLE))

#: ModelZoo option -> training flag (upstream diffusers names).
MODELZOO_FLAGS = {
    "model_name": "pretrained_model_name_or_path",
    "dataset_name": "dataset_name",
    "local_data_dir": "local_data_dir",
    "train_data_dir": "train_data_dir",
    "batch_size": "train_batch_size",
    "max_train_steps": "max_train_steps",
    "resolution": "resolution",
    "mixed_precision": "mixed_precision",
    "learning_rate": "learning_rate",
    "output_dir": "output_dir",
    "distributed": "distributed",
    "zero_stage": "zero_stage",
    "learning_check_min": "learning_check_min",
}
DATA_OPTIONS = ("dataset_name", "local_data_dir", "train_data_dir")


# The project's value types (cliutil).
_positive_int, _nonneg_int = positive_int, nonneg_int


def _number(text: str) -> str:
    # Checked here so a typo fails before anything starts; passed on as typed (1e-5 stays 1e-5).
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    return text


def _switch(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="training task (text_to_image, dreambooth, textual_inversion, controlnet, "
                                     "...; '-' and '_' both work)")
    g = parser.add_argument_group("devices and nodes (torchrun for more than one process)")
    g.add_argument("--num_devices", "--nproc", dest="num_devices", type=_positive_int, default=None, metavar="N",
                   help="processes (one per device) on this node; default 1, or 8 for an 8p --variant. More than "
                        "the node has is cut to what it has, with a note; on CPU the usable cores count as devices")
    g.add_argument("--nnodes", type=_positive_int, default=None, metavar="M",
                   help="nodes in the job; default $NNODES, else 1")
    g.add_argument("--node_rank", type=_nonneg_int, default=None, metavar="R",
                   help="this node's rank; default $NODE_RANK, else 0")
    g.add_argument("--master_addr", default=None, metavar="ADDR",
                   help="address of node 0; default $MASTER_ADDR, else 127.0.0.1")
    g.add_argument("--master_port", type=_positive_int, default=None, metavar="PORT",
                   help="rendezvous port on node 0; default $PORT, else 29500 (one node without a port: "
                        "torchrun --standalone picks a free one)")
    g.add_argument("--shutdown_timeout", type=_positive_int, default=None, metavar="SECONDS",
                   help="torchrun's --shutdown-timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT): how long torchrun lets "
                        "the ranks finish their pre-emption checkpoint, when a signal reaches torchrun itself, "
                        "before SIGKILL; default 600 (torchrun's own: 30). Signals sent to the launcher go to the "
                        "ranks directly and are not limited by it")

    g = parser.add_argument_group("run")
    g.add_argument("--dry_run", type=_switch, nargs="?", const=True, default=False, metavar="1|0",
                   help="print the command this machine would run (and, when devices are cut, the command for "
                        "the requested devices and nodes; the DeepSpeed config for --distributed=deepspeed) "
                        "and exit")
    g.add_argument("--log_dir", default=None, metavar="DIR",
                   help="where train_<id>.log (appended to on reruns) and <CaseName>.log go, <id> being "
                        "$ASCEND_DEVICE_ID; default output/<id> (the test/*.sh scripts: test/output/<id>)")
    g.add_argument("--variant", default=None, choices=sorted(VARIANTS), metavar="NAME",
                   help="one of the original 8-device text-to-image runs or the SD3 performance runs (settings in "
                        "diffusers_npu/launch/variants.py): " + ", ".join(sorted(VARIANTS)))
    g.add_argument("--script", default=None, metavar="PATH",
                   help="training script to run instead of the task's example script (e.g. your own copy)")

    g = parser.add_argument_group("training (ModelZoo --key=value options; each becomes the training flag named)")
    g.add_argument("--model_name", default=None, metavar="PATH_OR_ID",
                   help="--pretrained_model_name_or_path; without it the embedded offline digits model trains")
    g.add_argument("--dataset_name", default=None, metavar="NAME", help="--dataset_name (Hub id, folder or file)")
    g.add_argument("--local_data_dir", default=None, metavar="DIR", help="--local_data_dir (a save_to_disk folder)")
    g.add_argument("--train_data_dir", default=None, metavar="DIR",
                   help="--train_data_dir (images + metadata.jsonl)")
    g.add_argument("--batch_size", type=_positive_int, default=None, metavar="N",
                   help="--train_batch_size, per device")
    g.add_argument("--max_train_steps", type=_positive_int, default=None, metavar="N", help="--max_train_steps")
    g.add_argument("--resolution", type=_positive_int, default=None, metavar="PX", help="--resolution")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="--mixed_precision")
    g.add_argument("--learning_rate", type=_number, default=None, metavar="LR", help="--learning_rate")
    g.add_argument("--output_dir", default=None, metavar="DIR",
                   help="--output_dir; default <log_dir>/<Network>")
    g.add_argument("--distributed", default=None, choices=["ddp", "fsdp", "deepspeed"],
                   help="--distributed for runs of more than one process; default the task's (ddp for most)")
    g.add_argument("--zero_stage", type=int, default=None, choices=[2, 3],
                   help="--zero_stage for --distributed=deepspeed; default 2")
    g.add_argument("--learning_check", type=_switch, nargs="?", const=True, default=None, metavar="1|0",
                   help="end with the learning check (--learning_check); default 1 for the embedded "
                        "text-to-image main job, else 0")
    g.add_argument("--learning_check_min", type=_number, default=None, metavar="F",
                   help="--learning_check_min: the run exits 4 below this fraction")
    g.add_argument("--extra_args", default=None, metavar="'FLAGS'",
                   help="more training flags in one string, split like a shell does: "
                        "--extra_args='--instance_prompt=\"a photo of sks dog\" --use_lora' keeps the prompt "
                        "one value")


def split_training_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``(launcher options, training flags)``: the training flags are everything after the first ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def install_double_dash(parser: argparse.ArgumentParser) -> None:
    """Make ``parser`` hand everything after ``--`` over as ``training_flags``.

    argparse cannot do this itself under a sub-command: its positionals are matched before the ``--`` is
    seen, so flags after it end up "unrecognized". The parser object is created by ``cli.py``, hence the
    wrapper on the instance rather than a subclass.
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        import sys

        head, tail = split_training_flags(sys.argv[1:] if args is None else args)
        ns, extras = original(head, namespace)
        if extras:  # reported here, so the message names this command's --help and its nearest option
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        ns.training_flags = tail
        return ns, extras

    parser.parse_known_args = parse_known_args
    parser.set_defaults(training_flags=[])


__all__ = ["DATA_OPTIONS", "MODELZOO_FLAGS", "add_arguments", "install_double_dash",
           "split_training_flags"]

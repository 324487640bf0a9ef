"""``--push_to_hub``: upload the trained output at the end, as the upstream scripts do.

The local output is always written first and kept. Without network (the usual case for this project's users
on clusters) the push fails with one line saying what would have been pushed where.
"""
from __future__ import annotations

import os

from ..errors import UsageError
from ..model_folder import hub_is_reachable


def repo_id_for(args) -> str:
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def push_output(trainer, output: dict) -> dict:
    a = trainer.args
    repo = repo_id_for(a)
    files = output.get("files") or []
    if not hub_is_reachable():
        raise UsageError(f"--push_to_hub: the Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE is "
                         f"set), so {', '.join(files) or 'the output'} from {a.output_dir} was not pushed to "
                         f"{repo!r}; the trained output is kept in {a.output_dir}")
    from huggingface_hub import create_repo, upload_folder

    repo = create_repo(repo, exist_ok=True, token=a.hub_token).repo_id
    upload_folder(repo_id=repo, folder_path=a.output_dir, token=a.hub_token, commit_message="End of training",
                  ignore_patterns=["step_*", "epoch_*", "checkpoint-*", ".tmp-*", "logs/*"])
    return {"repo_id": repo, "files": files}

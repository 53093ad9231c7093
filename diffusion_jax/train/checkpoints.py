"""Orbax checkpoints of the train state, the data iterators and the model config.

Layout: <workdir>/checkpoints/<step>/{state, data, model_config}

* "state": the `TrainState` pytree (StandardSave), written asynchronously;
* "data": every process's data-iterator state as JSON, one file per process
  (`process_<i>-of-<n>.json`), so a resume continues with exactly the next batch;
* "model_config": `config.model` as JSON, compared with the current config
  before anything is restored, so a checkpoint of another architecture gives
  a one-line error instead of a shape error deep inside Orbax.

Orbax writes each step into a temporary directory and renames it only once
every item is complete (atomic finalisation), so a save interrupted by a crash
or `kill -9` is never listed as a step and never restored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

# Model-config fields that do not change the parameter tree; they may differ
# between the checkpoint and the run that resumes it.
NON_STRUCTURAL_MODEL_FIELDS = ("dropout", "dtype")


class DataStateHandler(ocp.CheckpointHandler):
    """Saves this process's data-iterator state (a JSON-able dict) to its own file."""

    @staticmethod
    def _filename(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._filename(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict:
        filename = self._filename(directory)
        if not filename.exists():
            raise ValueError(
                f"{filename} does not exist: the checkpoint was written by a different number "
                f"of processes; resume with {jax.process_count()} processes is not possible"
            )
        return json.loads(filename.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def model_config_dict(config: Any) -> dict:
    return json.loads(config.model.to_json())


def diff_model_configs(saved: dict, current: dict) -> list[str]:
    """Fields of config.model that differ and change the parameter tree."""
    keys = sorted(set(saved) | set(current))
    return [
        f"model.{k}: checkpoint {saved.get(k, '<absent>')!r} vs config {current.get(k, '<absent>')!r}"
        for k in keys
        if k not in NON_STRUCTURAL_MODEL_FIELDS and saved.get(k) != current.get(k)
    ]


class Checkpointer:
    """Saves every `every_steps` and at the end, keeps the last `keep`, resumes the latest."""

    def __init__(self, workdir: str, *, keep: int = 1, async_save: bool = True,
                 read_only: bool = False):
        # Orbax's tensorstore writer rejects relative paths (at the first save, not here),
        # and the default workdir runs/<experiment> is relative.
        self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=not read_only, read_only=read_only,
                enable_async_checkpointing=async_save,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": DataStateHandler(),
                "model_config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: Any) -> None:
        """Starts an asynchronous save of `state` (must be finite: the loop checks)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataStateSave(data_state),
                model_config=ocp.args.JsonSave(model_config_dict(config)),
            ),
            force=True,
        )

    def check_model_config(self, config: Any, step: int | None = None) -> None:
        """ValueError when the checkpoint at `step` (default latest) was written by another model config."""
        step = self.latest_step() if step is None else step
        if step is None:
            return
        saved = self.manager.restore(
            step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore())
        ).model_config
        diffs = diff_model_configs(saved, model_config_dict(config))
        if diffs:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} was written by a different model "
                f"config ({'; '.join(diffs)}); use another --workdir or the matching config"
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """(state, data_state) of checkpoint `step` (default: latest), or None without one.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings
        (e.g. `jax.eval_shape` of the init plus the replicated sharding).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=DataStateRestore(),
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `sharding`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore_ema_params(config: Any, workdir: str, step: int | None = None) -> Any:
    """EMA parameters of the latest (or given) checkpoint in `workdir`, replicated
    over the local devices. ValueError when there is none or it does not match
    `config.model`."""
    from diffusion_jax import models
    from diffusion_jax.train import parallel
    from diffusion_jax.train.state import create_train_state, make_optimizer

    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(
                f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first "
                f"(launch.py --mode train --workdir {workdir})"
            )
        ckpt.check_model_config(config, step)
        model = models.create(config.model)
        tx, _ = make_optimizer(config.training)
        shapes = jax.eval_shape(
            lambda k: create_train_state(model, config.model, tx, k), jax.random.PRNGKey(0))
        mesh = parallel.make_mesh()
        state, _ = ckpt.restore(abstract_like(shapes, parallel.replicated(mesh)), step)
        return state.ema_params
    finally:
        ckpt.close()


def latest_step(workdir: str) -> int | None:
    """Step of the newest finalised checkpoint in `workdir` (None without one)."""
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()

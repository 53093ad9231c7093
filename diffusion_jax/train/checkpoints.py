"""Orbax checkpoints of the train state, the data iterators and the model config.

Layout: <workdir>/checkpoints/<step>/{state, data, config, versions}

* "state": the `TrainState` pytree (StandardSave), written asynchronously;
* "data": every process's data-iterator state as JSON, one file per process
  (`process_<i>-of-<n>.json`), so a resume continues with exactly the next batch;
* "config": the whole experiment config as JSON, compared with the current
  config before anything is restored (`check_config`): a change to a field
  that changes what the network means or how it trains gives a one-line
  error naming the field, instead of a silent change or a tree error deep
  inside Orbax (checkpoints of older versions hold "model_config" instead);
* "versions": the versions of diffusion_jax, jax, flax, optax and orbax.

Orbax writes each step into a temporary directory and renames it only once
every item is complete (atomic finalisation), so a save interrupted by a crash
or `kill -9` is never listed as a step and never restored; the temporary
directories such saves leave are removed when a trainer opens the workdir
(`remove_interrupted_saves`). A step that is listed but does not restore (a
truncated file, an empty directory) is reported in one log line and skipped:
`restore` returns the newest step that restores. A trainer (a writable Checkpointer) moves
such a step aside to <workdir>/checkpoints/damaged/<step> (kept for inspection, logged), so
that it is never listed or chosen again and a later save of the same step can be written;
it does so once an older step has restored (with none restorable, nothing is moved and the
run stops, never starting afresh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

# Config fields (a section name covers all its fields) that may differ between
# a checkpoint and the run that resumes it: bookkeeping, sampling, evaluation
# and the process layout. EVERY other field, of every section, including
# fields added after this list was written, must match (`check_config`).
RESUMABLE_FIELDS = (
    "experiment", "sample", "eval", "parallel", "data.data_dir",
    "data.num_workers",  # where batches are computed, not what they are
    "data.loader",  # a change fails at the data state instead, in one line
    "data.source",  # the same examples, bit for bit, from another prepared file
    "training.num_steps",  # except with a decaying lr_schedule: see `_resumable`
    "training.log_every_steps", "training.checkpoint_every_steps", "training.sample_every_steps",
    "training.keep_checkpoints", "training.async_checkpointing", "training.progress_bar",
    "model.dropout", "model.dtype",  # do not change the parameter tree
    "model.label_init_std",  # used at initialisation only
)
# Fields added after checkpoints were written without them, with the value their absence meant:
# absent on one side and this value on the other is no change (the flow-map objectives, #23;
# the DiT's long skips and convolutions, #22).
ADDED_FIELDS = {"model.interval_input": False, "diffusion.objective": "denoising",
                "diffusion.flow.time_scale": 1000.0,
                "model.long_skip": False, "model.conv_head": False, "model.conv_stem": 0,
                "training.muon_lr_scale": 1.0, "diffusion.meanflow.tangent": "conditional"}
OVERRIDE = "--allow_config_change (train(..., allow_config_change=True))"
_INTERRUPTED_SAVE = re.compile(r"^\d+\.orbax-checkpoint-tmp")


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


def config_dict(config: Any) -> dict:
    """The config as JSON-able nested dicts (tuples become lists, as on disk), with the ""
    defaults of diffusion.prediction and .loss_weighting as the values they stand for
    (`config.resolve`, on a copy): what is saved and compared is always the real value."""
    d = config.get("diffusion", None) if hasattr(config, "copy_and_resolve_references") else None
    if d is not None and "" in (d.get("prediction", None), d.get("loss_weighting", None)):
        from diffusion_jax.train import config as config_lib

        config = config.copy_and_resolve_references()
        try:
            config_lib.resolve(config)
        except ValueError:
            pass  # an invalid diffusion section: validation names it; saved and compared as given
    return json.loads(config.to_json_best_effort())


def versions() -> dict[str, str]:
    """Versions of the packages a checkpoint depends on."""
    import flax
    import optax

    import diffusion_jax

    return {"diffusion_jax": diffusion_jax.__version__, "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__,
            "orbax-checkpoint": getattr(ocp, "__version__", "unknown")}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _resumable(field: str, saved: dict, current: dict) -> bool:
    if field == "training.num_steps":  # decay schedules end at num_steps: the rate of every step moves
        schedules = {saved.get("training.lr_schedule"), current.get("training.lr_schedule")}
        return schedules == {"constant"}
    parts = field.split(".")
    if parts[0] == "diffusion" and len(parts) > 2 and parts[1] in ("vp", "edm", "flow"):
        # the knobs of a process neither run uses (config.diffusion.<name>, processes.make)
        used = {saved.get("diffusion.process", "ddpm"), current.get("diffusion.process", "ddpm")}
        return parts[1] not in used
    if parts[0] == "diffusion" and len(parts) > 2 and parts[1] in ("meanflow", "shortcut"):
        # the knobs of an objective neither run uses (config.diffusion.<name>, flow_maps.make)
        used = {saved.get("diffusion.objective", "denoising"), current.get("diffusion.objective", "denoising")}
        return parts[1] not in used
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


class Change(NamedTuple):
    field: str
    saved: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.field}: checkpoint {self.saved!r} vs config {self.current!r}"


_ABSENT = "<absent>"


def diff_configs(saved: dict, current: dict) -> list[Change]:
    """Fields (dotted paths) that differ and are not in RESUMABLE_FIELDS.

    A field present on one side only counts as changed. `saved` of an old
    checkpoint holds only {"model": ...}: only the model is compared then."""
    flat_saved = _flatten(saved)
    flat_current = {k: v for k, v in _flatten(current).items() if k.split(".")[0] in saved}
    for flat in (flat_saved, flat_current):
        flat.update({k: v for k, v in ADDED_FIELDS.items() if k.split(".")[0] in saved and k not in flat})
    return [
        Change(k, flat_saved.get(k, _ABSENT), flat_current.get(k, _ABSENT))
        for k in sorted(set(flat_saved) | set(flat_current))
        if flat_saved.get(k, _ABSENT) != flat_current.get(k, _ABSENT)
        and not _resumable(k, flat_saved, flat_current)
    ]


def check_config(saved: dict, config: Any, where: str, *, allow_config_change: bool = False,
                 sections: tuple[str, ...] | None = None) -> list[Change]:
    """Raises a one-line ValueError when `config` differs from the checkpoint's
    `saved` config in a field that changes what the network means or how it
    trains; returns the changes (those of `sections` only, if given).

    Model changes alter the parameter tree and are never allowed; the others
    are allowed with `allow_config_change` (and returned, to be logged)."""
    changes = diff_configs(saved, config_dict(config))
    if sections is not None:
        changes = [c for c in changes if c.field.split(".")[0] in sections]
    model = [c for c in changes if c.field.startswith("model.")]
    if model:
        raise ValueError(
            f"checkpoint {where} was written by a different model config "
            f"({'; '.join(map(str, model))}); use another --workdir or the matching config")
    if changes and not allow_config_change:
        raise ValueError(
            f"checkpoint {where} was written by a different config "
            f"({'; '.join(map(str, changes))}), which changes what the network learns or how; "
            f"resume with the checkpoint's values, use another --workdir, or pass {OVERRIDE} "
            "to continue with the new ones")
    return changes


class CheckpointSaveError(RuntimeError):
    """A background checkpoint save failed."""


class Restored(NamedTuple):
    step: int
    state: Any  # the TrainState, or {"step", "params", "ema_params"} when opt_state_reset
    data_state: dict
    changes: list[Change]  # config changes accepted with allow_config_change
    opt_state_reset: bool  # the optimiser state did not fit the new config and was not restored


def remove_interrupted_saves(workdir: str) -> list[str]:
    """Deletes the temporary directories of saves that were killed before they
    finished (never restorable); returns their names. Only the one trainer of
    the workdir may call it (it holds the workdir lock)."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    removed = []
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if _INTERRUPTED_SAVE.match(name):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(name)
    if removed:
        logging.info("removed %d interrupted save(s) in %s: %s", len(removed), directory,
                     ", ".join(removed))
    return removed


class Checkpointer:
    """Saves every `every_steps` and at the end, keeps the last `keep`, resumes the
    newest step that restores."""

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
                "config": ocp.JsonCheckpointHandler(),
                "versions": ocp.JsonCheckpointHandler(),
                "model_config": ocp.JsonCheckpointHandler(),  # read from older checkpoints only
            },
        )
        self._saving: int | None = None  # step of a save started and not yet checked
        self.read_only = read_only

    def latest_step(self) -> int | None:
        """Newest finalised step (it may still fail to restore: see `restore`)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: Any) -> None:
        """Starts an asynchronous save of `state` (must be finite: the loop checks).

        Waits for the previous save first (as Orbax would) and raises its
        error, if it failed, as CheckpointSaveError."""
        self._finish_previous()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=DataStateSave(data_state),
                config=ocp.args.JsonSave(config_dict(config)),
                versions=ocp.args.JsonSave(versions()),
            ),
            force=True,
        )
        self._saving = step

    def _finish_previous(self) -> None:
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - whatever failed, the checkpoint is not there
            raise CheckpointSaveError(
                f"saving checkpoint {step} in {self.directory} failed ({type(e).__name__}: {e}); "
                f"the last complete checkpoint is step {self.latest_step()}") from e

    def check_for_errors(self) -> None:
        """CheckpointSaveError if the last save started has finished and failed
        (cheap, never waits: it looks only once that save is no longer in progress)."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self._finish_previous()

    def saved_config(self, step: int) -> dict:
        """The config stored with `step` ({"model": ...} for checkpoints of older versions)."""
        if (self.directory / str(step) / "config").exists():
            return dict(self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config)
        saved = self.manager.restore(
            step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore())).model_config
        return {"model": dict(saved)}

    def saved_versions(self, step: int) -> dict | None:
        if not (self.directory / str(step) / "versions").exists():
            return None
        return dict(self.manager.restore(
            step, args=ocp.args.Composite(versions=ocp.args.JsonRestore())).versions)

    def check_model_config(self, config: Any, step: int | None = None) -> None:
        """ValueError when the checkpoint at `step` (default latest) was written by another model config."""
        step = self.latest_step() if step is None else step
        if step is not None:
            check_config(self.saved_config(step), config, str(self.directory / str(step)),
                         sections=("model",))

    def _skip(self, step: int, error: Exception) -> str:
        text = f"step {step}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        logging.warning("checkpoint %s does not restore, skipping it (%s)",
                        self.directory / str(step), text)
        return text

    def _move_aside(self, steps: list[int]) -> None:
        """Moves damaged steps to checkpoints/damaged/<step> (<step>.1, ... if taken), so that
        they are no longer listed and a later save may write those steps again. Only a
        trainer's Checkpointer (not read-only), on process 0."""
        if not steps or self.read_only or jax.process_index() != 0:
            return
        damaged = os.path.join(str(self.directory), "damaged")
        os.makedirs(damaged, exist_ok=True)
        for step in steps:
            source = os.path.join(str(self.directory), str(step))
            target, n = os.path.join(damaged, str(step)), 0
            while os.path.exists(target):
                n += 1
                target = os.path.join(damaged, f"{step}.{n}")
            os.rename(source, target)
            logging.warning("moved damaged checkpoint %s to %s (kept for inspection)", source, target)
        self.manager.reload()

    def _newest_first(self, step: int | None) -> list[int]:
        return [step] if step is not None else sorted(self.all_steps(), reverse=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict] | None:
        """(state, data_state) of the newest checkpoint that restores (or `step`),
        None without any (see `resume`, which also checks the config)."""
        restored = self.resume(abstract_state, step)
        return None if restored is None else (restored.state, restored.data_state)

    def resume(self, abstract_state: Any, step: int | None = None, *, config: Any = None,
               allow_config_change: bool = False) -> Restored | None:
        """The newest checkpoint that restores (or `step`), None without any.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings
        (e.g. `jax.eval_shape` of the init plus the replicated sharding). With
        `config`, the checkpoint's config is checked first (`check_config`);
        when changes were allowed and the optimiser state no longer has the
        checkpoint's structure (e.g. adam -> adamw, clipping on/off), the step,
        parameters and EMA are restored alone (`opt_state_reset`). Damaged steps
        are skipped with one log line each; ValueError when there are steps but
        none restores.
        """
        failures, damaged = [], []
        for s in self._newest_first(step):
            where = str(self.directory / str(s))
            try:
                saved = self.saved_config(s) if config is not None else None
            except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
                failures.append(self._skip(s, e))
                damaged.append(s)
                continue
            changes = [] if config is None else check_config(
                saved, config, where, allow_config_change=allow_config_change)
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
                self._move_aside(damaged)
                return Restored(s, restored.state, restored.data, changes, False)
            except Exception as e:  # noqa: BLE001
                error = e
            if changes:  # the allowed change may have changed the optimiser state's tree
                try:
                    get = abstract_state.get if isinstance(abstract_state, dict) else \
                        lambda k: getattr(abstract_state, k)
                    parts = {k: get(k) for k in ("step", "params", "ema_params")}
                    state = self.restore_parts(s, parts)
                    data = self.manager.restore(
                        s, args=ocp.args.Composite(data=DataStateRestore())).data
                    self._move_aside(damaged)
                    return Restored(s, state, data, changes, True)
                except Exception:  # noqa: BLE001
                    pass
            failures.append(self._skip(s, error))
            damaged.append(s)
        if failures:
            raise ValueError(
                f"no checkpoint in {self.directory} restores ({'; '.join(failures)}); "
                "move the damaged steps away or use another --workdir")
        return None

    def restore_parts(self, step: int, abstract_parts: dict) -> dict:
        """Only the top-level fields of the saved state named in `abstract_parts`
        (e.g. {"ema_params": ...}); the others are not read."""
        path = self.directory / str(step) / "state"
        return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=abstract_parts, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_parts),
            partial_restore=True))

    def wait(self) -> None:
        """Until the last save is committed; CheckpointSaveError if it failed."""
        self._finish_previous()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


def abstract_like(tree: Any, sharding: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or structs) carrying `sharding`: one
    Sharding for every leaf, or a pytree of them shaped like `tree` (FSDP). Orbax
    restores onto these shardings whatever mesh wrote the checkpoint."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)


def restore_ema(config: Any, workdir: str, step: int | None = None, *,
                allow_config_change: bool = False) -> tuple[int, Any]:
    """(step, EMA parameters) of the newest checkpoint in `workdir` that restores
    (or of `step`), replicated over the devices. Only the EMA parameters are read
    and no optimiser is built. ValueError when there is none, or when its model
    or diffusion config differs from `config`'s (what the network's output means)."""
    from diffusion_jax import models
    from diffusion_jax.train import parallel
    from diffusion_jax.train.state import dummy_inputs

    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        steps = ckpt._newest_first(step)
        if not steps:
            raise ValueError(
                f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first "
                f"(launch.py --mode train --workdir {workdir})"
            )
        model = models.create(config.model)
        shapes = jax.eval_shape(
            lambda k: model.init({"params": k}, *dummy_inputs(config.model), train=False)["params"],
            jax.random.PRNGKey(0))
        abstract = {"ema_params": abstract_like(shapes, parallel.replicated_sharding(parallel.make_mesh()))}
        failures = []
        for s in steps:
            try:
                saved = ckpt.saved_config(s)
            except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
                failures.append(ckpt._skip(s, e))
                continue
            check_config(saved, config, str(ckpt.directory / str(s)),
                         allow_config_change=allow_config_change, sections=("model", "diffusion"))
            try:
                return s, ckpt.restore_parts(s, abstract)["ema_params"]
            except Exception as e:  # noqa: BLE001
                failures.append(ckpt._skip(s, e))
        raise ValueError(f"no checkpoint in {ckpt.directory} restores ({'; '.join(failures)}); "
                         "move the damaged steps away or use another --workdir")
    finally:
        ckpt.close()


def restore_ema_params(config: Any, workdir: str, step: int | None = None) -> Any:
    """EMA parameters of the newest restorable (or given) checkpoint (`restore_ema`)."""
    return restore_ema(config, workdir, step)[1]


def latest_step(workdir: str) -> int | None:
    """Step of the newest finalised checkpoint in `workdir` (None without one)."""
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()

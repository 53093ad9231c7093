"""Shared defaults of every experiment; each experiments/<name>.py overrides a few.

Every field an experiment may change is here, with its unit or range. The
`model` section is the model workstream's `models.default_config(name)`, so
its fields are documented there (diffusion_jax/models/__init__.py).
"""

import ml_collections

from diffusion_jax import flow_maps, models, processes, samplers
from diffusion_jax.evaluation.settings import EVAL_DEFAULTS, STAND_INS


def get_config(model_name: str = "unet") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "default"  # name; the default workdir is runs/<experiment>
    config.seed = 0  # integer >= 0; seeds the init, the train-step keys, the data order and the grids

    # --- data ---------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    config.data.dataset = "mnist"  # a name in diffusion_jax.data.DATASETS, or "synthetic" (test-only patterns)
    config.data.data_dir = ""  # prepared-data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.random_flip = False  # bool; horizontal flips (not for digits)
    config.data.loader = "numpy"  # numpy (the split decoded in memory) | grain (records read from disk, docs/benchmarks.md)
    config.data.num_workers = 0  # integer >= 0; grain worker processes computing batches (0 = in the trainer)
    # decoded (the uint8 cache, fast) | records (tfds' array_record files, PNGs decoded in the
    # workers; loader grain only); the same batches either way (diffusion_jax/data/grain_input.py)
    config.data.source = "decoded"

    # --- model (fields documented in diffusion_jax.models.default_config) ---
    config.model = models.default_config(model_name)

    # --- diffusion process and loss (diffusion_jax.processes, diffusion_jax.objectives) ---
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.process = "ddpm"  # ddpm | vp | edm | flow
    # network output: ddpm eps|x0|v|score; vp also velocity; edm edm|x0|eps|v; flow velocity|x0|v;
    # "" = the process's own: eps for ddpm and vp, edm for edm, velocity for flow (filled in,
    # and stored so in checkpoints, by diffusion_jax.train.config.validate)
    config.diffusion.prediction = ""
    # loss weight: none (the output's own MSE) | eps | x0 | min_snr; continuous processes also v | velocity | edm;
    # "" = the process's own: none for ddpm, vp and flow (eps / velocity MSE), edm for edm
    config.diffusion.loss_weighting = ""
    config.diffusion.min_snr_gamma = 5.0  # gamma > 0 of the min-SNR weighting
    # ddpm only: the discrete schedule, its T and reverse variance, and the hybrid loss
    config.diffusion.schedule = "linear"  # a name in diffusion_jax.schedules.NAMES
    config.diffusion.num_timesteps = 1000  # T, integer >= 1 (DDPM: 1000)
    # extra keyword arguments of the schedule constructor (linear: beta_start, beta_end in (0, 1))
    config.diffusion.schedule_kwargs = ml_collections.ConfigDict({"beta_start": 1e-4, "beta_end": 0.02})
    config.diffusion.variance = "small"  # reverse variance: small | large | learned_range (needs model.learn_sigma)
    config.diffusion.vlb_weight = 1e-3  # >= 0, weight of the VLB term with learn_sigma (Nichol & Dhariwal)
    # each continuous process's own knobs, used when it is selected (fields and ranges: its
    # dataclass in diffusion_jax/processes.py): vp (schedule linear|cosine, beta_min, beta_max,
    # t_eps, sigma_min, sigma_max), edm (sigma_data, p_mean, p_std, sigma_min, sigma_max),
    # flow (t_sampling uniform|logit_normal, logit_mean, logit_std, sigma_min, sigma_max, time_scale)
    for name in ("vp", "edm", "flow"):
        config.diffusion[name] = ml_collections.ConfigDict(processes.default_fields(name))
    # the training objective: denoising (the regression of the prediction above, every process)
    # | meanflow | shortcut (flow process, velocity prediction, model.interval_input: the network
    # learns the average velocity over [r, t] and samples in 1+ calls; diffusion_jax/flow_maps.py),
    # each with its own knobs (fields and ranges: its dataclass there): meanflow (ratio, norm_p,
    # norm_eps, omega, kappa), shortcut (bootstrap_fraction, num_levels, teacher current|ema, omega, kappa)
    config.diffusion.objective = "denoising"
    for name in ("meanflow", "shortcut"):
        config.diffusion[name] = ml_collections.ConfigDict(flow_maps.default_fields(name))

    # --- optimisation --------------------------------------------------------
    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128  # GLOBAL batch (all devices, all hosts); divisible by the device count
    config.training.num_steps = 10_000  # total optimiser updates, >= 1
    config.training.optimizer = "adam"  # adam | adamw | muon (Dense kernels; AdamW elsewhere)
    config.training.learning_rate = 2e-4  # peak learning rate, > 0
    config.training.muon_lr_scale = 1.0  # muon: the Dense kernels' rate is this x learning_rate (> 0)
    config.training.lr_schedule = "constant"  # after warm-up: constant | cosine | linear (to 0 at num_steps)
    config.training.warmup_steps = 1000  # linear warm-up from 0, >= 0 steps
    config.training.b1 = 0.9  # Adam beta1 in [0, 1)
    config.training.b2 = 0.999  # Adam beta2 in [0, 1)
    config.training.eps = 1e-8  # Adam epsilon > 0
    config.training.weight_decay = 0.0  # AdamW decoupled weight decay >= 0 (ignored by adam)
    config.training.grad_clip_norm = 1.0  # global-norm clipping threshold; 0 = off
    config.training.ema_decay = 0.9999  # EMA decay in [0, 1)
    config.training.ema_warmup = False  # bool; decay min(ema_decay, (1+step)/(10+step)) early on
    config.training.cond_drop_prob = 0.1  # probability in [0, 1] of the null label (classifier-free guidance)

    # --- bookkeeping ----------------------------------------------------------
    config.training.log_every_steps = 100  # scalars to TensorBoard + metrics.jsonl every N steps, >= 1
    config.training.checkpoint_every_steps = 1000  # Orbax save every N steps (and at the end), >= 1
    config.training.keep_checkpoints = 3  # keep the last K checkpoints, >= 1
    config.training.async_checkpointing = True  # bool; save in a background thread
    config.training.sample_every_steps = 1000  # EMA sample grid PNG every M steps (and at the end); 0 = only at the end
    config.training.progress_bar = True  # bool; tqdm bar with step rate and ETA (process 0)

    # --- sampling (training grids and --mode sample) --------------------------
    config.sample = ml_collections.ConfigDict()
    config.sample.method = "ddim"  # a name in diffusion_jax.samplers.NAMES
    config.sample.num_steps = 50  # sampler steps N >= 1 (ddpm: <= num_timesteps); NFE = N (heun, edm_sde: 2N - 1)
    config.sample.grid = ""  # time grid: "" = the sampler's default | rho | logsnr | cosine | cosine_half | linear | trailing | leading (ddpm)
    config.sample.eta = 0.0  # DDIM eta in [0, 1] (0 = deterministic)
    # the other samplers' settings, named as their dataclass fields in diffusion_jax/samplers.py
    # (rho of the "rho" grid; edm_sde's s_churn, s_noise, s_tmin, s_tmax)
    for field, value in samplers.default_settings().items():
        if field not in config.sample:
            config.sample[field] = value
    config.sample.guidance_scale = 2.0  # classifier-free guidance w >= 0 ((1+w) cond - w uncond); 0 = none
    # guide only where the noise level sigma = s(t) / a(t) lies in (lo, hi] (Kynkaenniemi et al.
    # 2024, "Applying guidance in a limited interval"); () = at every step
    config.sample.guidance_interval = ()
    config.sample.clip_x0 = 1.0  # clip predicted x0 to [-c, c]; 0 = no clipping
    config.sample.grid_per_class = 8  # training grids: images per class row (conditional) / grid side**2 / 8 (unconditional)
    config.sample.num_images = 64  # --mode sample: images to draw, >= 1
    config.sample.labels = ""  # --mode sample: comma-separated class labels ("3,3,7"), "" = cycle 0..K-1
    config.sample.batch_size = 256  # --mode sample: images per sampler call, >= 1

    # --- evaluation (--mode eval): every knob of diffusion_jax.evaluation.settings.EVAL_DEFAULTS,
    # documented there (None = taken from config.seed / config.sample) --------------
    # The None defaults are stored as their typed stand-ins (settings.STAND_INS), which mean the
    # same, so that the command line can override them (`--config.eval.guidance_sampler=heun`).
    config.eval = ml_collections.ConfigDict(
        {k: STAND_INS[k] if v is None else v for k, v in EVAL_DEFAULTS.items()})

    # --- multi-host -----------------------------------------------------------
    config.parallel = ml_collections.ConfigDict()
    config.parallel.distributed = False  # bool; True = jax.distributed.initialize() (also if $JAX_COORDINATOR_ADDRESS is set)
    config.parallel.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or auto-detect
    config.parallel.num_processes = -1  # processes in the job; -1 = $JAX_NUM_PROCESSES or auto-detect
    config.parallel.process_id = -1  # this process's index; -1 = $JAX_PROCESS_ID or auto-detect
    config.parallel.fsdp = 1  # integer >= 1 dividing the device count; mesh (data, fsdp): params, Adam state and EMA split over fsdp (1 = data parallel)
    return config

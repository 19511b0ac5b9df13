"""Every default value, once: the settings dataclasses and the command line both read these."""

# What a command works on when not told otherwise.
MODEL = "wan-i2v-tiny"  # the embedded default: the Wan2.1-I2V code with a tiny config and seeded weights
COMPONENT = "transformer"
TARGET = "x86"  # this machine's CPU
LOG_DIR = "logs"
OUT_DIR = "out"

# Tuning (autotune tune, TuneSettings).
TRIALS = 64  # new measured candidates per run, all tasks together
TRIALS_PER_ITER = 16  # candidates per measured batch: a crash loses at most one batch
BUILD_WORKERS = 2
BUILD_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 10.0  # bound on one candidate's measurement: a slow one costs at most this
RUNS_PER_MEASUREMENT = 3
MIN_REPEAT_MS = 20
SEED = 0
LIGHT_TASK_SHARE = 0.01  # kernels under this share of the module's FLOPs are "light" ...
LIGHT_TASK_TRIALS = 8  # ... and get one batch this size
REMEASURE_ROUNDS = 5  # after the search: interleaved rounds re-measuring each heavy kernel's best schedules (0: none)
REMEASURE_TOP = 3  # ... its fastest records, beside its default schedule ...
REMEASURE_MIN_SHARE = 0.02  # ... for the kernels holding at least this share of the model's tuned time
REMEASURE_MARGIN = 0.03  # a rival replaces the search's best only with a median this much lower (a near tie keeps it)

# Running and timing.
RUN_REPEAT = 20
PROFILE_TOP = 15

# autotune demo.
DEMO_TRIALS = 128
DEMO_REPEAT = 30

# autotune bench.
BENCH_WORKLOADS = "tiny-transformer,tiny-vae-decoder,tiny-image-encoder"
BENCH_ROUNDS = 15
BENCH_MIN_SECONDS = 60.0  # each workload's rounds go on until they have taken this long ...
BENCH_MAX_ROUNDS = 500  # ... up to this many
BENCH_SLOW_CALL_SECONDS = 20.0  # an engine slower than this per call is timed once, not every round
BENCH_PRECISION = "fp32"  # comma list of fp32, bf16, int8: every engine at each
BENCH_OUT_DIR = "tools/results"

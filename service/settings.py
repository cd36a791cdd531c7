"""All settings, from the environment (prefix SALIENCY_) or flags of `python -m service`."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = ROOT / "models"  # the cards this source tree ships (the default model's among them)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SALIENCY_", env_file=None)

    host: str = Field("127.0.0.1", description="address to bind (loopback by default)")
    port: int = Field(8000, ge=0, le=65535)
    models_dir: Path = Field(SHIPPED_MODELS, description="directory of model cards (*.toml)")
    models_mode: Literal["add", "replace"] = Field(
        "add", description="add: models_dir's cards are added to the shipped ones (a card of the same name "
                           "replaces the shipped one), so the default model stays; replace: only "
                           "models_dir's cards (then default_model must be one of them, or /readyz says 503)")
    models: list[str] | None = Field(None, description="load only these cards (default: all)")
    default_model: str = Field("efficientnet_lite0", description="the model of a request that names none; "
                                                                 "/readyz says 503 while it is not loaded")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda, cuda:1 ...")

    # Batching
    max_batch_cost: int = Field(
        256, ge=1, description="most images per forward pass in one batch (an IG image at n_steps=50 "
                               "costs 50; MoreauGrad costs n_samples)")
    max_batch_items: int = Field(32, ge=1, description="most requests' images in one batch")
    max_wait_ms: float = Field(
        0.0, ge=0, description="how long a batch waits for company after its first item. 0: an idle worker "
                               "starts at once, so a lone request waits for nothing; under load batches "
                               "still form from the queue that builds while the worker runs "
                               "(docs/benchmarks.md, \"Service overhead: one request on an idle server\")")
    max_pass_batch: int = Field(
        256, ge=1, description="memory budget: most images in one forward pass (on a GPU, lowered at "
                               "start-up to what measured memory allows; a GPU pass waits on the host's "
                               "kernel launches, so larger passes give more images/s: docs/benchmarks.md, "
                               "\"GPU\", its \"MoreauGrad 200 x 32 on ResNet-50 at batch 8\")")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="default reduced precision of model passes (per-request parameter `precision`; "
                            "how each method applies it: service/engine.py precision_scope)")
    cpu_reduced_precision: bool = Field(
        False, description="accept a request's bf16/fp16 `precision` for a model on the CPU; off by default: "
                           "without native half-precision kernels those passes run many times slower than "
                           "fp32, so one request could hold the worker for minutes (docs/benchmarks.md, "
                           "\"Reduced precision on the CPU\")")
    gpu_memory_fraction: float = Field(
        0.8, gt=0, le=1, description="share of a GPU's free memory at start-up that model passes may use; "
                                     "each of the two lanes sizes its passes to half of it, and an engine "
                                     "process (worker=process) is held to its half")
    gpu_warmup: bool = Field(
        True, description="on a GPU, each thread that runs passes first runs one at each padded batch size a "
                          "queue batch can reach (service/warmup.py); /readyz waits for it")
    cache_bytes: int = Field(256 * 2**20, ge=0, description="result cache size (0 disables it)")
    cpu_pass_batch: int = Field(
        8, ge=1, description="most images per forward pass on a CPU: there a larger pass cost more per "
                             "image, its fresh activations page-faulted and zeroed on every pass "
                             "(docs/benchmarks.md, \"Engine: methods vs peers\"); with retain_host_memory, "
                             "lowered per model at start-up so that its largest activation stays below "
                             "glibc's 32 MiB mmap threshold (service/calibrate.py; docs/benchmarks.md, "
                             "\"Page faults\")")
    max_queue: int = Field(256, ge=1, description="pending images before requests get 429 (per lane)")
    bulk_cost: int = Field(
        2000, ge=1, description="images costing more passes than this run on the bulk lane, a second worker, "
                                "so they never hold up interactive work")

    worker: Literal["auto", "thread", "process"] = Field(
        "auto", description="where each lane runs its model passes: a thread of the server process, or a "
                            "child process of its own, whose GIL no HTTP work contends for "
                            "(service/engine_process.py); auto: process on a GPU, where a pass is hundreds "
                            "of kernel launches that each need the GIL; thread on a CPU, where the hand-off "
                            "costs an idle request more than the GIL costs under load (docs/benchmarks.md, "
                            "\"Process worker\")")
    cudnn_benchmark: bool = Field(
        False, description="let cuDNN autotune each new input shape: a batching server sees new pass sizes "
                           "all the time, and each one stalls the worker while it is timed "
                           "(service/zoo/registry.py set_cudnn_autotuning; docs/benchmarks.md, "
                           "\"Service under load\")")
    fold_batchnorm: bool = Field(
        True, description="fold each eval-mode BatchNorm into the convolution before it at load (the same "
                          "function, one op fewer per layer; every method's maps are unchanged, "
                          "service/zoo/fold.py)")
    retain_host_memory: bool = Field(
        True, description="keep freed host memory for the next pass instead of returning it to the kernel "
                          "(glibc only; see service/host.py); on a CPU the interactive lane's pass thread "
                          "then runs two passes before /readyz says ready (service/warmup.py)")

    watchdog_s: float = Field(1.0, gt=0,
                              description="how often a dead worker thread is noticed and restarted")

    # Deadlines
    queue_deadline_s: float = Field(30.0, gt=0, description="work not started by then is dropped with 504")
    sync_wait_s: float = Field(
        30.0, gt=0, description="a synchronous request still running after this becomes a job "
                                "(202 with its id)")
    job_deadline_s: float = Field(3600.0, gt=0, description="start deadline of job work")
    job_ttl_s: float = Field(3600.0, gt=0, description="finished jobs are forgotten after this")
    max_jobs: int = Field(1000, ge=1, description="jobs kept in memory (finished ones are evicted first)")
    self_test_at_load: bool = Field(
        True, description="run each model's quick self-test before /readyz says ready (every method once at "
                          "its cheapest parameters on a shipped photo): /v1/models lists the methods that "
                          "apply, and a method that does not answers 422 method_not_applicable at once")
    sanity_deadline_s: float = Field(
        3600.0, gt=0, description="a model's sanity report (POST /v1/models/{name}/sanity) still running "
                                  "after this is stopped and its job fails with deadline_exceeded")
    max_sanity_jobs: int = Field(
        2, ge=1, description="sanity reports queued or running at once (they run one at a time, in a thread "
                             "of their own beside the lanes); one more gets 429")
    max_job_result_bytes: int = Field(
        2 * 2**30, ge=0, description="encoded maps held by finished jobs' results; beyond it the oldest "
                                     "finished jobs are forgotten first (the newest stays)")

    # Limits on what a request may ask for
    max_images: int = Field(16, ge=1, description="images per request")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="bytes per image file")
    max_image_pixels: int = Field(40_000_000, ge=1, description="pixels per image (decompression bombs)")
    max_request_pixels: int = Field(
        200_000_000, ge=1, description="pixels of all a request's images together: maps at the original "
                                       "size, overlays and the JSON around them grow with it, and so does "
                                       "the server's peak memory (docs/benchmarks.md, \"Photo sizes\")")
    max_response_bytes: int = Field(
        128 * 2**20, ge=1, description="bytes of one answer as sent (its JSON, or the overlay PNG of Accept: "
                                       "image/png), bounded from the images' headers before any work runs; "
                                       "beyond it 413 response_too_large, whose message names the requests "
                                       "that would fit (size=input, png for npy, fewer images). A map at the "
                                       "original size as base64 float32 .npy takes 5.3 bytes per pixel: 128 "
                                       "MiB passes one 24 MP photo's (122 MiB), two 12 MP ones, or one 12 MP "
                                       "photo with every output, and refuses one of 40 MP (203 MiB), which "
                                       "the server would hold several times over while encoding and sending "
                                       "it (docs/architecture.md, \"Limits\")")
    max_pixels_in_flight: int = Field(
        400_000_000, ge=1, description="pixels of the images of all calls queued or running; a call beyond "
                                       "it gets 429 (the queue counts images, and one may hold up to "
                                       "max_image_pixels)")
    max_body_bytes: int = Field(100 * 2**20, ge=1, description="request body size")
    max_request_cost: int = Field(200_000, ge=1, description="forward+backward passes per request")
    top_k: int = Field(5, ge=1, le=100)
    metrics_by_default: bool = Field(
        False, description="a call that names no outputs gets the per-map metrics too (outputs npy,metrics): "
                           "about 4 K forward passes more per image (K = steps, 20 by default)")

    # Security
    api_key: str | None = Field(
        None, min_length=16, description="when set, every /v1 route needs it "
                                         "(Authorization: Bearer <key> or X-API-Key: <key>)")
    allow_insecure_bind: bool = Field(False, description="allow a non-loopback host without an API key")

    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM: time for in-flight work to finish")
    log_level: str = "info"

    @property
    def card_dirs(self) -> tuple[Path, ...]:
        """Where the model cards are read, in order: a later directory's card replaces an earlier one's of
        the same name (service/zoo/cards.py `find_cards`). Every loader of models reads these."""
        if self.models_mode == "replace" or self.models_dir.resolve() == SHIPPED_MODELS.resolve():
            return (self.models_dir,)
        return (SHIPPED_MODELS, self.models_dir)

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")

    def check_bind(self) -> None:
        """Refuse to expose an unauthenticated service beyond this machine unless told to."""
        if not self.loopback and not self.api_key and not self.allow_insecure_bind:
            raise SystemExit(f"refusing to bind {self.host} without an API key: set SALIENCY_API_KEY, or "
                             "SALIENCY_ALLOW_INSECURE_BIND=true if something else authenticates callers")

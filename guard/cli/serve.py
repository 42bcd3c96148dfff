"""``guard serve``: an OpenAI-compatible endpoint that guards every request with a policy.

Start-up problems (bad policy, missing model, impossible settings, vLLM not installed) are one line on stderr
and exit code 2; the policy file is then watched and reloaded on change (a bad edit keeps the old policy).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
import yaml

from guard.cli.output import console, fail
from guard.errors import CertifyError, DetectorError, GuardUnavailable, ModelError, PolicyError
from guard.policy import load_policy

if TYPE_CHECKING:
    from serving.config import ServerSettings


def serve(
    policy_file: Annotated[Path, typer.Option("--policy", "-p", help="Policy YAML file (reloaded on change).",
                                              show_default=False)] = ...,
    model: Annotated[str, typer.Option(help="Model reference (embedded:smollm2 or a folder); with --upstream, "
                                            "the upstream's model name.")] = "embedded:smollm2",
    upstream: Annotated[str | None, typer.Option(help="Guard an OpenAI-compatible server at this base URL "
                                                      "(e.g. http://localhost:8001/v1).")] = None,
    upstream_tokenizer: Annotated[str | None, typer.Option(
        help="Model reference with the upstream model's tokenizer, so penalties go out as logit_bias.")] = None,
    upstream_api_key: Annotated[str | None, typer.Option(envvar="GUARD_UPSTREAM_API_KEY",
                                                         help="Bearer key for the upstream.")] = None,
    upstream_timeout: Annotated[float, typer.Option(help="Seconds to wait for the upstream before answering "
                                                         "504 upstream_timeout.")] = 600.0,
    engine: Annotated[Literal["auto", "transformers", "upstream", "vllm"],
                      typer.Option(help="auto: upstream with --upstream, else transformers. vllm needs "
                                        "pip install .[vllm].")] = "auto",
    served_model_name: Annotated[str | None, typer.Option(help="Model name clients use (default: --model).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", envvar="GUARD_API_KEY",
                                                      help="Accepted Bearer key (repeat for several); "
                                                           "none: no authentication.")] = None,
    admin_api_key: Annotated[list[str] | None, typer.Option(
        "--admin-api-key", envvar="GUARD_ADMIN_API_KEY",
        help="Key that may also send an inline policy to /v1/guard/checks (repeatable).")] = None,
    max_request_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1_000_000,
    max_checked_chars: Annotated[int, typer.Option(help="Requests whose input (all messages, or one prompt) is "
                                                        "longer get 400: the guard never checks part of a request."
                                                   )] = 32_000,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 4096,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens of chat requests that set none.")] = 256,
    batch_wait_ms: Annotated[float, typer.Option(help="How long to gather concurrent requests into one batch.")] = 5.0,
    max_batch_size: Annotated[int, typer.Option(help="Most requests decoded together.")] = 8,
    vllm_option: Annotated[list[str] | None, typer.Option(
        "--vllm-option", help="KEY=VALUE for vLLM's AsyncEngineArgs (repeatable), e.g. max_model_len=4096.")] = None,
    image_model: Annotated[str | None, typer.Option(
        help="Local Stable Diffusion (1.x/2.x/XL) folder to serve at /v1/images/generations.")] = None,
    image_nsfw_threshold: Annotated[float | None, typer.Option(
        help="Check generated images with Open-NSFW; scores at or above this are regenerated or refused.")] = None,
    policy_map: Annotated[Path | None, typer.Option(
        help="YAML file binding API keys (or key ids) to policy files; other keys get --policy. Each policy is "
             "hot-reloaded on its own.", show_default=False)] = None,
    decision_log: Annotated[str | None, typer.Option(
        help="Append one JSON line per request (stages, concepts, action, certificate) to this file; - for "
             "stdout.", show_default=False)] = None,
    max_queue: Annotated[int, typer.Option(help="Most POST /v1 requests in the server at once; more get 429 with "
                                                "Retry-After.")] = 64,
    reload: Annotated[bool, typer.Option(help="Reload the policy when its file changes.")] = True,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes behind the one port, each with its own engine "
                                                     "and guard (same settings and policy file, each reloading it).")
                       ] = 1,
    log_level: Annotated[Literal["debug", "info", "warning", "error"], typer.Option()] = "info",
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models (and /v1/images/generations with --image-model)
    with the policy guarding every request."""
    import uvicorn

    from serving.app import build_app
    from serving.config import ServerSettings, SettingsError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    chosen = ("upstream" if upstream else "transformers") if engine == "auto" else engine
    vllm_options = {}
    for option in vllm_option or []:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise fail(f"--vllm-option expects KEY=VALUE, got '{option}'")
        vllm_options[key.strip()] = yaml.safe_load(value)  # numbers and booleans keep their type
    try:
        settings = ServerSettings(
            policy_path=policy_file, model=model, engine=chosen, served_model_name=served_model_name,
            upstream_url=upstream, upstream_api_key=upstream_api_key, upstream_tokenizer=upstream_tokenizer,
            upstream_timeout_s=upstream_timeout,
            api_keys=tuple(api_key or ()), admin_api_keys=tuple(admin_api_key or ()),
            max_request_bytes=max_request_bytes, max_checked_chars=max_checked_chars,
            max_tokens_limit=max_tokens_limit,
            default_max_tokens=default_max_tokens, batch_wait_ms=batch_wait_ms, max_batch_size=max_batch_size,
            reload_policy=reload, vllm_options=vllm_options, image_model=image_model,
            image_nsfw_threshold=image_nsfw_threshold, policy_map=policy_map, decision_log=decision_log,
            max_queue=max_queue)
        policy = load_policy(policy_file)  # a bad policy fails before any model is loaded
        if workers > 1:  # each worker loads its own engine and guard: none is loaded here
            _serve_workers(settings, host, port, log_level, workers)
            return
        loading = f"the {chosen} engine ({model})" + (f", the image model ({image_model})" if image_model else "")
        with console.status(f"loading {loading} and the guard"):
            server_app = build_app(settings, policy)
    except (SettingsError, PolicyError, ModelError, GuardUnavailable, CertifyError, DetectorError) as err:
        raise fail(str(err)) from None
    except ImportError as err:
        raise fail(f"the {chosen} engine is not installed ({err}); for vLLM: pip install '.[vllm]'") from None
    except OSError as err:  # the decision log cannot be opened
        raise fail(str(err)) from None

    server = uvicorn.Server(uvicorn.Config(server_app, host=host, port=port, log_level=log_level))
    try:
        server.run()
    except SystemExit:  # uvicorn exits on a failed start-up; say why in one line instead
        pass
    if server_app.state.startup_error is not None:
        raise fail(f"the server did not start: {server_app.state.startup_error}")
    if not server.started:
        raise fail(f"the server did not start (is {host}:{port} free?)")


def _serve_workers(settings: "ServerSettings", host: str, port: int, log_level: str, workers: int) -> None:
    """``workers`` processes on one port (uvicorn's supervisor; the kernel spreads connections between them). The
    guard is stateless per request, so any worker may answer any request; each loads its own engine and guard and
    watches the policy file itself, so an edit reaches every worker within its reload debounce."""
    import uvicorn

    settings.to_environment()
    uvicorn.run("serving.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level=log_level)

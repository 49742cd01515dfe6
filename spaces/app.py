"""LOUPE zero-shot detection, visual grounding and region–phrase alignment: a Gradio app.

Locally:   python spaces/app.py [--checkpoint PATH_OR_HUB_ID] [--port N] [--host HOST]
As a Space: the Space runs this file; the module-level `demo` is the app.

The checkpoint is `--checkpoint`, else `$LOUPE_CHECKPOINT`, else the main job's
`outputs/demo/checkpoint`, else a tiny one trained once into `~/.cache/loupe-hf/space-checkpoint`.
The model loads (or trains) in the background; the status line at the top says how far it got.
The logic lives in `loupe_space.py` beside this file; this file only lays out components and wires events.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import transformers

APP_DIR = Path(__file__).resolve().parent
# The Space's own module sits beside this file; make it importable however the app is started.
sys.path.insert(0, str(APP_DIR))

from loupe_space import (  # noqa: E402
    MAX_LABELS,
    MAX_UPLOAD_BYTES,
    TABLE_HEADERS,
    UNSIL_HEADERS,
    BackgroundLoader,
    DemoInputError,
    LoupeDemo,
)

REPO_ROOT = APP_DIR.parent
EXAMPLES = APP_DIR / "examples"
# Long enough for loading a checkpoint, short enough that a click during training gets an answer.
LOAD_WAIT_SECONDS = 60

# The per-key load report of transformers is noise for app users (pre-training heads are unused).
transformers.utils.logging.set_verbosity_error()
loader = BackgroundLoader(repo_root=REPO_ROOT)
logger = logging.getLogger("loupe_space")


# --- handlers -------------------------------------------------------------------------------------


def _call(view: Callable[..., Any], *args: Any) -> Any:
    """Runs one `LoupeDemo` view; input problems become a `gr.Error` with their message, notes
    become warnings. Any other exception also becomes a `gr.Error` with the project's own message
    (and its traceback goes to the log): gradio would show a bare "Error", and gradio_client an
    "upstream app raised an exception", saying nothing of what went wrong."""
    try:
        result = view(loader.wait(LOAD_WAIT_SECONDS), *args)
    except DemoInputError as error:
        raise gr.Error(str(error)) from error
    except Exception as error:
        logger.exception("the demo failed on an input")
        raise gr.Error(
            f"The demo could not process this input ({type(error).__name__}: {error}). "
            "Please try another image or text, and report the problem if it persists."
        ) from error
    for note in result.notes:
        gr.Warning(note)
    return result


def _notes(notes: list[str]) -> str:
    return "\n\n".join(f"**Note:** {note}" for note in notes)


def detect(image: Any, labels: str, threshold: float, top_k: float) -> tuple:
    """Boxes for comma-separated labels: annotated image, table, raw JSON, notes."""
    result = _call(LoupeDemo.detect, image, labels, threshold, top_k)
    table = pd.DataFrame(result.table, columns=TABLE_HEADERS)
    return result.image, table, result.detections, _notes(result.notes)


def ground(image: Any, expression: str) -> tuple:
    """The best box for a referring expression: annotated image, score, raw JSON, notes."""
    result = _call(LoupeDemo.ground, image, expression)
    return result.image, round(result.score, 4), result.grounding, _notes(result.notes)


def explain(image: Any, caption: str, num_regions: float) -> tuple:
    """Phrases, top regions, token-level interaction map, alignment and semantic interaction
    matrices, UNSIL table and message, raw JSON, notes."""
    result = _call(LoupeDemo.explain, image, caption, num_regions)
    return (
        result.highlighted,
        result.regions_image,
        result.interaction_image,
        result.matrices,
        pd.DataFrame(result.unsil_table, columns=UNSIL_HEADERS),
        result.unsil_message,
        result.explanation,
        _notes(result.notes),
    )


def poll_status() -> tuple[str, gr.Timer]:
    """The loader's status line; the timer stops once the model is loaded (or failed)."""
    return loader.status, gr.Timer(active=not loader.done)


def start_loading() -> str:
    """Starts loading when the app was imported rather than run (e.g. `gradio app.py`)."""
    loader.start()
    return loader.status


# --- layout ---------------------------------------------------------------------------------------


def _examples(*rows: tuple[str, str]) -> list[list[str]]:
    return [[str(EXAMPLES / name), text] for name, text in rows]


def image_input(elem_id: str) -> gr.Image:
    # image_mode=None keeps the uploaded mode, so that the demo converts it and says so; a file path
    # (gradio then decodes nothing) lets the demo check the pixel count from the file's header
    # before decoding it (`prepare_image`).
    return gr.Image(type="filepath", image_mode=None, label="Image", elem_id=elem_id, height=320)


def image_output(label: str, elem_id: str) -> gr.Image:
    return gr.Image(label=label, elem_id=elem_id, format="png", interactive=False, height=420)


def detect_tab() -> None:
    with gr.Row():
        with gr.Column():
            image = image_input("detect-image")
            labels = gr.Textbox(
                label=f"Labels (comma-separated, at most {MAX_LABELS})",
                placeholder="cat, red circle, cup",
                elem_id="detect-labels",
            )
            threshold = gr.Slider(
                0.0, 1.0, value=0.1, step=0.01, label="Score threshold", elem_id="detect-threshold"
            )
            top_k = gr.Slider(1, 50, value=10, step=1, label="Top-k", elem_id="detect-top-k")
            button = gr.Button("Detect", variant="primary", elem_id="detect-button")
        with gr.Column():
            output = image_output("Detections", "detect-output")
            notes = gr.Markdown(label="Notes", elem_id="detect-notes")
            table = gr.Dataframe(
                headers=TABLE_HEADERS, interactive=False, label="Detections", elem_id="detect-table"
            )
            raw = gr.JSON(label="Raw detections", elem_id="detect-json")
    gr.Examples(
        _examples(
            ("shapes_4.png", "hexagon, diamond, circle"),
            ("shapes_6.png", "pentagon, circle, star"),
            ("shapes_13.png", "star, triangle, heart, circle"),
            ("astronaut.jpg", "person, flag, helmet, rocket"),
            ("chelsea.jpg", "cat, eye, ear"),
            ("coffee.jpg", "cup, spoon, saucer"),
        ),
        inputs=[image, labels],
    )
    button.click(
        detect, [image, labels, threshold, top_k], [output, table, raw, notes], api_name="detect"
    )


def ground_tab() -> None:
    with gr.Row():
        with gr.Column():
            image = image_input("ground-image")
            expression = gr.Textbox(
                label="Referring expression", placeholder="the red star", elem_id="ground-text"
            )
            button = gr.Button("Ground", variant="primary", elem_id="ground-button")
        with gr.Column():
            output = image_output("Best region", "ground-output")
            score = gr.Number(label="Score", elem_id="ground-score", interactive=False)
            notes = gr.Markdown(label="Notes", elem_id="ground-notes")
            raw = gr.JSON(label="Raw result", elem_id="ground-json")
    gr.Examples(
        _examples(
            ("shapes_6.png", "the small circle"),
            ("shapes_13.png", "the heart"),
            ("astronaut.jpg", "the flag"),
            ("coffee.jpg", "the spoon"),
        ),
        inputs=[image, expression],
    )
    button.click(ground, [image, expression], [output, score, raw, notes], api_name="ground")


EXPLAIN_INTRO = (
    "LOUPE learns from image–caption pairs through **Shapley interactions**. *Token level* (TSA): "
    "how much a region's patches cooperate, beyond their separate contributions, in matching the "
    "caption; the region module's confidences are trained towards it. *Semantics level* (FSA): "
    "how much region k and phrase j cooperate in the fine-grained region–phrase similarity; the "
    "alignment matrix is trained towards it. *UNSIL* learns to predict these interactions so that "
    "pre-training need not sample every one. Estimates use a fixed seed: the same inputs give the "
    "same picture."
)


def explain_tab() -> None:
    gr.Markdown(EXPLAIN_INTRO)
    with gr.Row():
        with gr.Column(scale=2):
            image = image_input("explain-image")
            caption = gr.Textbox(
                label="Caption",
                placeholder="a small red star to the left of a large blue circle",
                elem_id="explain-text",
            )
            num_regions = gr.Slider(
                1, 16, value=5, step=1, label="Regions to show", elem_id="explain-regions"
            )
            button = gr.Button("Explain", variant="primary", elem_id="explain-button")
            phrases = gr.HighlightedText(label="Phrases", elem_id="explain-phrases")
            notes = gr.Markdown(label="Notes", elem_id="explain-notes")
        with gr.Column(scale=3):
            with gr.Row():
                regions = image_output("Most confident regions", "explain-output")
                interaction = image_output("Token-level interaction (TSA)", "explain-interaction")
            gr.Markdown(
                "Right: each cell is coloured by the token-level interaction I([R]) of the most "
                "confident box centred on it (what that box's confidence is trained towards); red: "
                "its patches cooperate, blue: they compete. The boxes are the regions on the left, "
                "labelled with their own I([R])."
            )
    # Full width, so that the two matrices stay readable.
    matrices = image_output(
        "Region × phrase: alignment (left) and semantic interaction (right, the FSA target)",
        "explain-matrices",
    )
    unsil_message = gr.Markdown(elem_id="explain-unsil-message")
    unsil = gr.Dataframe(
        headers=UNSIL_HEADERS,
        interactive=False,
        label="UNSIL's prediction against the sampled interaction",
        elem_id="explain-unsil",
    )
    raw = gr.JSON(label="Raw explanation", elem_id="explain-json")
    gr.Examples(
        _examples(
            ("shapes_4.png", "a picture showing a small red hexagon and a large green diamond"),
            ("shapes_13.png", "a white star, an orange triangle and a brown heart"),
            ("chelsea.jpg", "a cat with green eyes on a wooden floor"),
        ),
        inputs=[image, caption],
    )
    button.click(
        explain,
        [image, caption, num_regions],
        [phrases, regions, interaction, matrices, unsil, unsil_message, raw, notes],
        api_name="explain",
    )


def build_demo() -> gr.Blocks:
    """The app: a status line, then the Detect, Ground and Explain tabs."""
    with gr.Blocks(title="LOUPE: zero-shot detection and grounding") as blocks:
        gr.Markdown(
            "# LOUPE\nZero-shot object detection, visual grounding and region–phrase alignment "
            "from a vision-language model pre-trained on image–caption pairs only "
            "(LOUPE, Li et al., NeurIPS 2022)."
        )
        status = gr.Markdown(loader.status, elem_id="status")
        with gr.Tabs():
            with gr.Tab("Detect", id="detect"):
                detect_tab()
            with gr.Tab("Ground", id="ground"):
                ground_tab()
            with gr.Tab("Explain", id="explain"):
                explain_tab()
        timer = gr.Timer(1.0)
        timer.tick(poll_status, outputs=[status, timer], api_visibility="private")
        blocks.load(start_loading, outputs=status, api_visibility="private")
    return blocks


demo = build_demo()
# gradio refuses larger uploads before storing them (the demo checks paths again, for `gradio app.py`
# and other launches that do not pass this).
LAUNCH_OPTIONS: dict[str, Any] = {"max_file_size": MAX_UPLOAD_BYTES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--checkpoint", help="checkpoint directory or Hub id")
    parser.add_argument(
        "--port", type=int, help="server port (default: $GRADIO_SERVER_PORT or 7860)"
    )
    parser.add_argument("--host", help="server address (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    args = parser.parse_args(argv)
    loader.start(args.checkpoint)
    demo.launch(server_name=args.host, server_port=args.port, **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()

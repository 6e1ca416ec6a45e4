#!/usr/bin/env python3
"""GIMP 3 plug-in: drag editing (DragDiffusion / GoodDrag) through the Drag Diffusion backend.

Filters › Generic › Drag Diffusion… reads the selected layer, the selection (what may change)
and a path whose anchors come in handle→target pairs, sends them to the backend, and adds the
result as a new layer above the source layer in one undo step. Also callable through the PDB
as ``python-fu-drag-diffusion``. All GIMP calls happen here, on the plug-in's main thread;
the pure logic is in dragdiff_geometry.py and the backend conversation in dragdiff_backend.py.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.realpath(__file__))
VENDOR = os.path.join(HERE, "vendor")  # pyzmq + msgpack wheels for GIMP's Python (install.py)
for _path in (VENDOR, HERE):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
import dragdiff_backend as backend  # noqa: E402
import dragdiff_geometry as geo  # noqa: E402
from gi.repository import Gegl, Gimp, GLib, GObject  # noqa: E402

PROC_NAME = "python-fu-drag-diffusion"
RW = GObject.ParamFlags.READWRITE
LAYER_TYPES = {1: Gimp.ImageType.GRAY_IMAGE, 2: Gimp.ImageType.GRAYA_IMAGE,
               3: Gimp.ImageType.RGB_IMAGE, 4: Gimp.ImageType.RGBA_IMAGE}
METHOD_LABELS = {"dragdiffusion": "DragDiffusion", "gooddrag": "GoodDrag",
                 "dragdiffusion-paper": "DragDiffusion (paper settings)"}
# (property name, engine parameter, nick, minimum, maximum, is-int)
KNOBS = (
    ("lora-steps", "lora_steps", "LoRA steps", -1, 2000, True),
    ("drag-steps", "drag_steps", "Drag steps", -1, 5000, True),
    ("inversion-strength", "inversion_strength", "Inversion strength", -1.0, 1.0, False),
    ("latent-lr", "latent_lr", "Latent learning rate", -1.0, 1.0, False),
    ("lam", "lam", "Mask-keeping weight (λ)", -1.0, 100.0, False),
    ("work-size", "work_size", "Working size (px)", -1, 2048, True),
    ("n-inference-steps", "n_inference_steps", "Diffusion steps", -1, 1000, True),
)
ADVANCED = ("latent-lr", "lam", "work-size", "n-inference-steps", "advanced",
            "backend", "timeout", "make-path")


class Inputs:
    """Everything read from the image for one run (layer coordinates throughout)."""

    def __init__(self, image: Gimp.Image, layer: Gimp.Layer) -> None:
        self.layer = layer
        self.width, self.height = layer.get_width(), layer.get_height()
        _, ox, oy = layer.get_offsets()
        self.offsets = (ox, oy)
        self.format, self.channels = geo.pixel_format(layer.is_gray(), layer.has_alpha())
        self.handles, self.targets = read_drags(image, self.offsets, self.width, self.height)
        self.mask = read_mask(image, geo.Rect(ox, oy, self.width, self.height))
        self.pixels = layer.get_buffer().get(
            Gegl.Rectangle.new(0, 0, self.width, self.height), 1.0, self.format,
            Gegl.AbyssPolicy.NONE)


def read_drags(image: Gimp.Image, offsets: tuple[int, int], width: int,
               height: int) -> tuple[list[geo.Point], list[geo.Point]]:
    """Handle→target pairs (layer coordinates) from the selected or only path."""
    path = geo.pick_path(image.get_paths(), image.get_selected_paths())
    strokes = [geo.stroke_anchors(path.stroke_get_points(stroke)[1])
               for stroke in path.get_strokes()]
    handles, targets = geo.pair_anchors(strokes)
    handles, targets = geo.to_layer(handles, offsets), geo.to_layer(targets, offsets)
    geo.check_inside(handles, targets, width, height)
    return handles, targets


def read_mask(image: Gimp.Image, layer_rect: geo.Rect) -> bytes | None:
    """The selection over the layer as width×height u8 bytes; None = everything may change."""
    _, non_empty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    bounds = geo.Rect(x1, y1, x2 - x1, y2 - y1) if non_empty else None
    region = geo.selection_region(bounds, layer_rect)
    if region is None:
        return None
    pixels = image.get_selection().get_buffer().get(
        Gegl.Rectangle.new(region.x, region.y, region.width, region.height), 1.0, "Y u8",
        Gegl.AbyssPolicy.NONE)
    local = region.translate(-layer_rect.x, -layer_rect.y)
    return geo.mask_or_none(geo.place_mask(pixels, local, layer_rect.width, layer_rect.height))


def insert_result(image: Gimp.Image, inputs: Inputs, result: backend.JobResult, name: str,
                  make_path: bool) -> tuple[Gimp.Layer, Gimp.Path | None]:
    """Add the result layer (and the optional path) above the source, as one undo step."""
    if (result.width, result.height, result.channels) != (inputs.width, inputs.height,
                                                          inputs.channels):
        raise backend.BackendError(
            f"The backend returned a {result.width}×{result.height}×{result.channels} image "
            f"for a {inputs.width}×{inputs.height}×{inputs.channels} layer.")
    source = inputs.layer
    image.undo_group_start()
    try:
        layer = Gimp.Layer.new(image, name, inputs.width, inputs.height,
                               LAYER_TYPES[inputs.channels], 100.0, Gimp.LayerMode.NORMAL)
        layer.set_offsets(*inputs.offsets)
        image.insert_layer(layer, source.get_parent(), image.get_item_position(source))
        buffer = layer.get_buffer()
        buffer.set(Gegl.Rectangle.new(0, 0, inputs.width, inputs.height), inputs.format,
                   result.pixels)
        buffer.flush()
        layer.update(0, 0, inputs.width, inputs.height)
        path = None
        if make_path:
            path = Gimp.Path.new(image, f"{name} – tracked handles")
            image.insert_path(path, None, 0)
            for handle, target in zip(geo.to_image(result.handles, inputs.offsets),
                                      geo.to_image(inputs.targets, inputs.offsets),
                                      strict=True):
                stroke = path.bezier_stroke_new_moveto(*handle)
                path.bezier_stroke_lineto(stroke, *target)
            image.set_selected_paths([path])
        image.set_selected_layers([layer])
    finally:
        image.undo_group_end()
    Gimp.displays_flush()
    return layer, path


class GimpUI(backend.Feedback):
    """Progress in GIMP's progress bar; in interactive mode also a small dialog with Cancel."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.dialog = self.bar = None
        self._cancelled = False
        self._last = (None, -1.0)
        Gimp.progress_init("Drag Diffusion")
        if interactive:
            self._open_dialog()

    def _open_dialog(self) -> None:
        gi.require_version("GimpUi", "3.0")
        gi.require_version("Gtk", "3.0")
        from gi.repository import GimpUi, Gtk

        self.dialog = GimpUi.Dialog(title="Drag Diffusion – working", role=PROC_NAME)
        self.dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
        self.dialog.connect("response", lambda *_: self._cancel())
        self.dialog.connect("delete-event", lambda *_: self._cancel() or True)
        box = self.dialog.get_content_area()
        box.set_border_width(12)
        box.set_spacing(8)
        self.bar = Gtk.ProgressBar(show_text=True)
        self.bar.set_size_request(360, -1)
        box.pack_start(self.bar, False, False, 0)
        self.dialog.show_all()
        self._gtk = Gtk

    def _cancel(self) -> None:
        self._cancelled = True
        if self.bar is not None:
            self.bar.set_text("Cancelling…")

    def progress(self, fraction: float | None, text: str) -> None:
        if (text, fraction) == self._last:
            return
        self._last = (text, fraction)
        Gimp.progress_set_text(text)
        if fraction is None:
            Gimp.progress_pulse()
        else:
            Gimp.progress_update(fraction)
        if self.bar is not None and not self._cancelled:
            self.bar.set_text(text)
            if fraction is None:
                self.bar.pulse()
            else:
                self.bar.set_fraction(fraction)
        self.idle()

    def cancelled(self) -> bool:
        return self._cancelled

    def idle(self) -> None:
        if self.dialog is not None:
            while self._gtk.events_pending():
                self._gtk.main_iteration_do(False)

    def close(self) -> None:
        Gimp.progress_end()
        if self.dialog is not None:
            self.dialog.destroy()
            self.idle()
            self.dialog = None


def show_dialog(procedure: Gimp.Procedure, config: Gimp.ProcedureConfig) -> bool:
    gi.require_version("GimpUi", "3.0")
    from gi.repository import GimpUi

    GimpUi.init(PROC_NAME)
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Drag Diffusion")
    dialog.get_label("advanced-title", "Advanced", False, False)
    dialog.fill_box("advanced-box", ADVANCED)
    dialog.fill_expander("advanced-expander", "advanced-title", False, "advanced-box")
    dialog.fill(["method", "prompt", "seed", "lora-steps", "drag-steps", "inversion-strength",
                 "advanced-expander"])
    ok = dialog.run()
    dialog.destroy()
    return ok


def knob_values(config: Gimp.ProcedureConfig) -> dict[str, float]:
    return {param: config.get_property(prop) for prop, param, *_ in KNOBS}


def text(config: Gimp.ProcedureConfig, name: str) -> str:
    """A string argument; GIMP hands back None for an empty string in some paths."""
    return config.get_property(name) or ""


def error_return(procedure: Gimp.Procedure, status: Gimp.PDBStatusType,
                 message: str) -> Gimp.ValueArray:
    return procedure.new_return_values(status, GLib.Error(message))


def run(procedure: Gimp.Procedure, run_mode: Gimp.RunMode, image: Gimp.Image,
        drawables: list[Gimp.Drawable], config: Gimp.ProcedureConfig,
        data: object) -> Gimp.ValueArray:
    interactive = run_mode == Gimp.RunMode.INTERACTIVE
    if interactive and not show_dialog(procedure, config):
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    ui = None
    try:
        if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
            raise geo.InputError("Select exactly one layer (not a mask or channel) in the "
                                 "Layers dialog.")
        inputs = Inputs(image, drawables[0])
        method = config.get_property("method")
        params = geo.build_params(knob_values(config), text(config, "advanced"))
        job = backend.JobSpec(
            pixels=inputs.pixels, width=inputs.width, height=inputs.height,
            channels=inputs.channels, mask=inputs.mask, handles=inputs.handles,
            targets=inputs.targets, method=method, params=params,
            prompt=text(config, "prompt"), seed=config.get_property("seed"))
        ui = GimpUI(interactive)
        result = backend.run_drag(job, text(config, "backend"),
                                  float(config.get_property("timeout")), ui)
        name = geo.result_layer_name(inputs.layer.get_name(), method, len(inputs.handles))
        layer, path = insert_result(image, inputs, result, name,
                                    config.get_property("make-path"))
    except backend.JobCancelled as exc:
        return error_return(procedure, Gimp.PDBStatusType.CANCEL, str(exc))
    except (geo.InputError, backend.BackendError) as exc:
        if interactive:
            Gimp.message(str(exc))
        return error_return(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, str(exc))
    except Exception as exc:  # never let GIMP see an uncaught exception (it loses the text)
        traceback.print_exc()  # to GIMP's stderr, for bug reports
        message = f"Drag Diffusion failed: {type(exc).__name__}: {exc}"
        if interactive:
            Gimp.message(message)
        return error_return(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, message)
    finally:
        if ui is not None:
            ui.close()
    info = {"layer": name, "method": method, "params": params, "drags": len(inputs.handles),
            "handles": geo.to_image(inputs.handles, inputs.offsets),
            "targets": geo.to_image(inputs.targets, inputs.offsets),
            "final_handles": geo.to_image(result.handles, inputs.offsets),
            "masked": inputs.mask is not None, "timings": result.timings,
            "path": path.get_name() if path else None, "job_id": result.job_id,
            "pyzmq": getattr(sys.modules.get("zmq"), "__file__", None)}
    values = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    values.remove(1)
    values.insert(1, GObject.Value(Gimp.Layer, layer))
    values.remove(2)
    values.insert(2, GObject.Value(GObject.TYPE_STRING, json.dumps(info)))
    return values


class DragDiffusion(Gimp.PlugIn):
    def do_set_i18n(self, name: str) -> bool:
        return False

    def do_query_procedures(self) -> list[str]:
        return [PROC_NAME]

    def do_create_procedure(self, name: str) -> Gimp.Procedure:
        p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        p.set_image_types("RGB*, GRAY*")
        p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        p.set_menu_label("Drag Diffusion…")
        p.add_menu_path("<Image>/Filters/Generic")
        p.set_documentation(
            "Move image content along drags with a diffusion model",
            "Draw a path whose anchors come in pairs — handle (the point to move), then its "
            "target — either one two-anchor stroke per drag or handle, target, handle, target "
            "in one stroke. Optionally select the area that may change. The result is added "
            "as a new layer above the selected layer; one Undo removes it. Numeric settings "
            "at -1 use the method's default.", name)
        p.set_attribution("GIMP Drag Diffusion contributors", "GPL-3.0-or-later", "2025")

        methods = Gimp.Choice.new()
        for number, method in enumerate(geo.METHODS):
            methods.add(method, number, METHOD_LABELS[method], "")
        p.add_choice_argument("method", "_Method", "Drag algorithm and its settings",
                              methods, "dragdiffusion", RW)
        p.add_string_argument("prompt", "_Prompt", "What the image shows (optional; helps "
                              "the model)", "", RW)
        p.add_int_argument("seed", "_Seed", "Random seed", 0, 2**31 - 1, 42, RW)
        for prop, param, nick, low, high, is_int in KNOBS:
            blurb = f"-1 = method default ({geo.defaults_hint(param)})"
            if is_int:
                p.add_int_argument(prop, nick, blurb, low, high, -1, RW)
            else:
                p.add_double_argument(prop, nick, blurb, low, high, -1.0, RW)
        p.add_string_argument("advanced", "Other settings (JSON)",
                              'More engine parameters as a JSON object, e.g. {"r_m": 1, '
                              '"feather": 5}', "", RW)
        p.add_string_argument("backend", "_Backend",
                              "Connection file of the backend (empty: the default one)", "", RW)
        p.add_int_argument("timeout", "_Timeout (s)", "How long to wait for the backend to "
                           "answer or start", 1, 3600, 120, RW)
        p.add_boolean_argument("make-path", "Add a path with the _tracked handles",
                               "Also add a path from each handle's final position to its "
                               "target", False, RW)
        p.add_layer_return_value("new-layer", "New layer", "The result layer", True, RW)
        p.add_string_return_value("info", "Info", "JSON: drags, final handle positions, "
                                  "timings", "", RW)
        return p


Gimp.main(DragDiffusion.__gtype__, sys.argv)

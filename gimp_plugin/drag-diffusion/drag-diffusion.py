#!/usr/bin/env python3
"""GIMP 3 plug-in: drag editing (Inpaint4Drag / DragDiffusion / GoodDrag) through the Drag
Diffusion backend.

Filters › Generic › Drag Diffusion… reads the selected layer, the selection (for Inpaint4Drag
the region that moves; for DragDiffusion and GoodDrag the area that may change) and a path whose
anchors come in handle→target pairs, sends them to the backend, and adds the result as a new
layer above the source layer in one undo step. For Inpaint4Drag the dialog shows the warp live
before OK. Also callable through the PDB as ``python-fu-drag-diffusion``. All GIMP calls happen
on the plug-in's main thread, in this file (image in, layer out) and dragdiff_ui.py (windows);
the pure logic lives in dragdiff_geometry (paths, selection), dragdiff_params (settings),
dragdiff_progress (times), dragdiff_preview (the warp preview) and dragdiff_layer (pixel
formats, changed pixels, naming); the backend conversation in dragdiff_backend.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HERE = os.path.dirname(os.path.realpath(__file__))
if HERE not in sys.path:  # the plug-in's modules and its protocol/ package (standard library only)
    sys.path.insert(0, HERE)

import gi  # noqa: E402

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
import dragdiff_backend as backend  # noqa: E402
import dragdiff_geometry as geo  # noqa: E402
import dragdiff_layer as lay  # noqa: E402
import dragdiff_params as par  # noqa: E402
import dragdiff_preview as pre  # noqa: E402
import dragdiff_progress as prog  # noqa: E402
from gi.repository import Gegl, Gimp, Gio, GLib, GObject  # noqa: E402

PROC_NAME = "python-fu-drag-diffusion"
HELP_DOMAIN = "org.gimp-drag-diffusion"
RW = GObject.ParamFlags.READWRITE
# The method choice when no backend's table is known (no backend answered, no hello kept in the
# state file, no install.json): the plug-in has nobody to ask. The first is preselected, as the
# engine's default method (backend/engine/types.py); any table replaces the list and its
# default_method the choice.
FALLBACK_METHODS = ("inpaint4drag", "dragdiffusion", "gooddrag", "dragdiffusion-paper")


def state_file() -> Path:
    """The plug-in's remembered state (last hello, typed values, measured speed)."""
    return Path(Gimp.directory()) / "plug-in-settings" / "drag-diffusion-state.json"


class Inputs:
    """What is read from the image for one run (layer coordinates throughout). ``moves``: the
    selection is the region that moves (Inpaint4Drag), not the area that may change."""

    def __init__(self, image: Gimp.Image, layer: Gimp.Layer, moves: bool = False) -> None:
        self.layer = layer
        self.width, self.height = layer.get_width(), layer.get_height()
        _, ox, oy = layer.get_offsets()
        self.offsets = (ox, oy)
        self.precision = image.get_precision().value_nick
        self.handles, self.targets = read_drags(image, self.offsets, self.width, self.height)
        self.mask = read_mask(image, geo.Rect(ox, oy, self.width, self.height), moves)

    def read_pixels(self, dtypes: list[str]) -> tuple[lay.PixelFormat, bytes]:
        """The layer's pixels in the best format the backend accepts for its precision."""
        return layer_pixels(self.layer, self.precision, dtypes)


def layer_pixels(layer: Gimp.Layer, precision: str,
                 dtypes: list[str]) -> tuple[lay.PixelFormat, bytes]:
    """A layer's pixels as an edit sends them (the dialog's prepare reads the same bytes)."""
    fmt = lay.pixel_format(precision, layer.is_gray(), layer.has_alpha(), dtypes)
    pixels = layer.get_buffer().get(Gegl.Rectangle.new(0, 0, layer.get_width(),
                                                       layer.get_height()),
                                    1.0, fmt.babl, Gegl.AbyssPolicy.NONE)
    return fmt, pixels


def make_preparer(image: Gimp.Image, drawables: list[Gimp.Drawable],
                  link: backend.PreviewLink) -> backend.Preparer | None:
    """The dialog's prepare for the one selected layer, reading its pixels as the edit will."""
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
        return None
    layer = drawables[0]
    dtypes = [str(d) for d in (link.info or {}).get("dtypes") or ["u8"]]

    def read() -> tuple[str, int, bytes]:
        fmt, pixels = layer_pixels(layer, image.get_precision().value_nick, dtypes)
        return fmt.dtype, fmt.channels, bytes(pixels)

    return backend.Preparer(link, read, layer.get_width(), layer.get_height())


def has_selection(image: Gimp.Image) -> bool:
    return bool(Gimp.Selection.bounds(image)[1])


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


def read_mask(image: Gimp.Image, layer_rect: geo.Rect, moves: bool = False) -> bytes | None:
    """The selection over the layer as width×height u8 bytes; None = everything may change
    (never with ``moves``: then the selection is the region that moves)."""
    _, non_empty, x1, y1, x2, y2 = Gimp.Selection.bounds(image)
    bounds = geo.Rect(x1, y1, x2 - x1, y2 - y1) if non_empty else None
    region = geo.selection_region(bounds, layer_rect, moves)
    if region is None:
        return None
    pixels = image.get_selection().get_buffer().get(
        Gegl.Rectangle.new(region.x, region.y, region.width, region.height), 1.0, "Y u8",
        Gegl.AbyssPolicy.NONE)
    local = region.translate(-layer_rect.x, -layer_rect.y)
    return geo.mask_or_none(geo.place_mask(pixels, local, layer_rect.width, layer_rect.height),
                            moves)


class PreviewReader:
    """Reads the live warp preview's inputs, scaled to ``pre.PREVIEW_SIDE``: the layer's pixels
    once (they do not change while its dialog is open), the selection and the drags at every
    look (they may)."""

    def __init__(self, image: Gimp.Image, layer: Gimp.Drawable) -> None:
        self.image, self.layer = image, layer
        self.width, self.height = layer.get_width(), layer.get_height()
        self.scale = pre.preview_scale(self.width, self.height)
        self.size = pre.scaled_size(self.width, self.height, self.scale)
        self._pixels: tuple[bytes, int] | None = None

    def pixels(self) -> tuple[bytes, int]:
        if self._pixels is None:
            alpha = self.layer.has_alpha()
            fmt = "R'G'B'A u8" if alpha else "R'G'B' u8"
            data = self.layer.get_buffer().get(Gegl.Rectangle.new(0, 0, *self.size),
                                               self.scale, fmt, Gegl.AbyssPolicy.CLAMP)
            self._pixels = (bytes(data), 4 if alpha else 3)
        return self._pixels

    def __call__(self) -> pre.PreviewInputs:
        _, ox, oy = self.layer.get_offsets()
        handles, targets = read_drags(self.image, (ox, oy), self.width, self.height)
        w, h = self.size
        _, non_empty, *_bounds = Gimp.Selection.bounds(self.image)
        mask = None
        if non_empty:
            data = bytes(self.image.get_selection().get_buffer().get(
                Gegl.Rectangle.new(round(ox * self.scale), round(oy * self.scale), w, h),
                self.scale, "Y u8", Gegl.AbyssPolicy.NONE))
            mask = data if any(data) else None
        pixels, channels = self.pixels()
        return pre.PreviewInputs(
            pixels, w, h, channels, mask, pre.scale_points(handles, self.scale, w, h),
            pre.scale_points(targets, self.scale, w, h))


def insert_result(image: Gimp.Image, inputs: Inputs, fmt: lay.PixelFormat, sent: bytes,
                  result: backend.JobResult, name: str,
                  make_path: bool) -> tuple[Gimp.Layer, Gimp.Path | None, int]:
    """Add the result layer (and the optional path) above the source, as one undo step.

    The layer is a copy of the source in its own precision; only the pixels the backend
    changed are written into it, so all others stay bit-identical. Also returns how many
    rows changed."""
    if (result.width, result.height, result.channels) != (inputs.width, inputs.height,
                                                          fmt.channels):
        raise backend.BackendError(
            f"The backend returned a {result.width}×{result.height}×{result.channels} image "
            f"for a {inputs.width}×{inputs.height}×{fmt.channels} layer.")
    if result.dtype != fmt.dtype or len(result.pixels) != len(sent):
        raise backend.BackendError(f"The backend returned {result.dtype} pixels "
                                   f"({len(result.pixels)} bytes) for {fmt.dtype} pixels "
                                   f"({len(sent)} bytes).")
    runs = lay.changed_runs(sent, result.pixels, inputs.width, fmt.bytes_per_pixel)
    source = inputs.layer
    image.undo_group_start()
    try:
        layer = Gimp.Layer.new_from_drawable(source, image)
        layer.set_name(name)
        image.insert_layer(layer, source.get_parent(), image.get_item_position(source))
        buffer = layer.get_buffer()
        row = inputs.width * fmt.bytes_per_pixel
        bpp = fmt.bytes_per_pixel
        for x, y, w, h in lay.rectangles(runs):
            data = b"".join(result.pixels[(y + r) * row + x * bpp:(y + r) * row + (x + w) * bpp]
                            for r in range(h))
            buffer.set(Gegl.Rectangle.new(x, y, w, h), fmt.babl, data)
        buffer.flush()
        box = lay.bounding_box(runs)
        if box:
            layer.update(*box)
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
    return layer, path, len({y for y, _, _ in runs})


class StatusBar(backend.Feedback):
    """Progress in GIMP's status bar (every run; interactive runs add a window)."""

    def __init__(self) -> None:
        self._last: tuple = ()
        Gimp.progress_init("Drag Diffusion")

    def progress(self, fraction: float | None, text: str, detail: str = "") -> None:
        if (fraction, text, detail) == self._last:
            return
        self._last = (fraction, text, detail)
        Gimp.progress_set_text(f"{text} — {detail}" if detail else text)
        if fraction is None:
            Gimp.progress_pulse()
        else:
            Gimp.progress_update(fraction)

    def close(self) -> None:
        Gimp.progress_end()


def knob_values(config: Gimp.ProcedureConfig) -> dict[str, float]:
    return {k.prop: float(config.get_property(k.prop)) for k in par.KNOBS}


def text(config: Gimp.ProcedureConfig, name: str) -> str:
    """A string argument; GIMP hands back None for an empty string in some paths."""
    return config.get_property(name) or ""


def make_tracker(table: par.ParamTable | None, method: str, params: dict, inputs: Inputs,
                 session: backend.Session, state: dict,
                 preparer: backend.Preparer | None = None) -> prog.Tracker:
    """The edit's progress; with the dialog's ``preparer``, the steps its prepare did and
    their measured times count (the edit joins that prepare or finds its results)."""
    resolved = table.resolved(method, params) if table else dict(params)
    speed = (state.get("speeds") or {}).get(prog.speed_key(session.device, session.model_name))
    prepared = preparer.done() if preparer is not None and preparer.job_id else None
    return prog.Tracker(
        prog.plan_steps(resolved), sequential=resolved.get("method") != "gooddrag",
        drag_end_step=resolved.get("drag_end_step"), speed=speed,
        megapixels=prog.working_megapixels(inputs.width, inputs.height,
                                           par.working_width(resolved),
                                           resolved.get("work_max_side", 0)),
        costs=prog.step_costs(resolved), prepared=prepared,
        prepared_times=preparer.times if prepared is not None else None)


def edit(image: Gimp.Image, layer: Gimp.Drawable, config: Gimp.ProcedureConfig,
         table: par.ParamTable | None, feedback: backend.Feedback, interactive: bool,
         state_path: Path, client: object = None,
         preparer: backend.Preparer | None = None) -> dict:
    """Read, send, wait, insert: one edit. Returns the info for the PDB caller. ``client``:
    the dialog's connection, whose prepare (``preparer``) the edit joins."""
    if not isinstance(layer, Gimp.Layer):
        raise geo.InputError("Select exactly one layer (not a mask or channel) in the "
                             "Layers dialog.")
    method = config.get_property("method")
    algorithm = table.algorithm(method) if table else method
    inputs = Inputs(image, layer, moves=pre.region_moves(algorithm))
    params = par.overrides(knob_values(config), text(config, "advanced"))
    session = backend.open_session(text(config, "backend"),
                                   float(config.get_property("timeout")), feedback, client)
    try:
        par.write_state(state_path, hello=session.info)
        if session.demo_model:
            feedback.notice(backend.demo_notice(session.info))
        if session.device.startswith("cpu") and not pre.region_moves(algorithm):
            feedback.notice("The backend runs on the CPU: this takes a while.")
        fmt, pixels = inputs.read_pixels(session.dtypes)
        job = backend.JobSpec(
            pixels=pixels, width=inputs.width, height=inputs.height, channels=fmt.channels,
            mask=inputs.mask, handles=inputs.handles, targets=inputs.targets, method=method,
            params=params, prompt=text(config, "prompt"), seed=config.get_property("seed"),
            dtype=fmt.dtype, preview=interactive)
        state = par.read_state(state_path)
        tracker = make_tracker(table, method, params, inputs, session, state, preparer)
        result = session.run(job, feedback, tracker)
        measured = tracker.measured_speed()
        if measured is not None:
            key = prog.speed_key(session.device, session.model_name)
            par.write_state(state_path, speeds=prog.remember_speed(
                dict(state.get("speeds") or {}), key, measured))
    finally:
        session.close()
    name = lay.result_layer_name(layer.get_name(), method, len(inputs.handles),
                                 session.demo_model)
    new_layer, path, rows = insert_result(image, inputs, fmt, pixels, result, name,
                                          config.get_property("make-path"))
    if result.warnings and interactive:
        Gimp.message("Drag Diffusion finished, with a warning:\n" + "\n".join(result.warnings))
    return {"layer": new_layer, "name": name, "method": method, "params": params,
            "drags": len(inputs.handles),
            "handles": geo.to_image(inputs.handles, inputs.offsets),
            "targets": geo.to_image(inputs.targets, inputs.offsets),
            "final_handles": geo.to_image(result.handles, inputs.offsets),
            "masked": inputs.mask is not None, "timings": result.timings,
            "warnings": result.warnings, "precision": inputs.precision, "dtype": fmt.dtype,
            "format": fmt.babl, "previews": result.previews, "demo_model": session.demo_model,
            "changed_rows": rows, "filler": result.stats.get("filler"),
            "path": path.get_name() if path else None, "job_id": result.job_id,
            "transport": session.transport,
            "pyzmq": getattr(sys.modules.get("zmq"), "__file__", None)}


def error_return(procedure: Gimp.Procedure, status: Gimp.PDBStatusType,
                 message: str) -> Gimp.ValueArray:
    """GIMP shows an execution error's text to the user itself: no second message box."""
    return procedure.new_return_values(status, GLib.Error(message))


def run(procedure: Gimp.Procedure, run_mode: Gimp.RunMode, image: Gimp.Image,
        drawables: list[Gimp.Drawable], config: Gimp.ProcedureConfig,
        data: object) -> Gimp.ValueArray:
    interactive = run_mode == Gimp.RunMode.INTERACTIVE
    state_path = state_file()
    install = backend.InstallInfo.load()
    hello = link = client = preparer = None
    if interactive:
        gi.require_version("GimpUi", "3.0")
        import dragdiff_ui as ui
        from gi.repository import GimpUi

        GimpUi.init(PROC_NAME)
        link = backend.PreviewLink(text(config, "backend"))  # kept for the warp preview
        hello = link.info
        if hello:
            par.write_state(state_path, hello=hello)
    state = par.read_state(state_path)
    table = par.load_table(hello, state, {"parameters": install.parameters})
    if interactive:
        size = (drawables[0].get_width(), drawables[0].get_height()) if drawables else (1, 1)
        manual = (install.start_command() or ".venv/bin/python -m backend serve in the Drag "
                  "Diffusion folder") if install.why_not_startable() else None
        reader = PreviewReader(image, drawables[0]) if len(drawables) == 1 else None
        preparer = make_preparer(image, drawables, link)
        dialog = ui.SettingsDialog(procedure, config, ui.DialogContext(
            table, state.get("hello"), hello is not None, size, state_path, state, manual,
            link=link, read_preview=reader, preparer=preparer,
            has_selection=lambda: has_selection(image)))
        ok = dialog.run()
        table = dialog.table  # a download in the dialog may have changed what is served
        if not ok:
            if preparer is not None:
                preparer.cancel()
            link.close()
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
        client = link.detach()  # the edit goes on in this session: its prepare stays alive
    feedback = ui.ProgressWindow(StatusBar()) if interactive else StatusBar()
    try:
        if len(drawables) != 1:
            raise geo.InputError("Select exactly one layer (not a mask or channel) in the "
                                 "Layers dialog.")
        info = edit(image, drawables[0], config, table, feedback, interactive, state_path,
                    client, preparer)
        client = None  # the edit's session closed it
    except backend.JobCancelled as exc:
        return error_return(procedure, Gimp.PDBStatusType.CANCEL, str(exc))
    except (geo.InputError, par.ParamsError, backend.BackendError) as exc:
        return error_return(procedure, Gimp.PDBStatusType.EXECUTION_ERROR, str(exc))
    except Exception as exc:  # never let GIMP see an uncaught exception (it loses the text)
        traceback.print_exc()  # to GIMP's stderr, for bug reports
        return error_return(procedure, Gimp.PDBStatusType.EXECUTION_ERROR,
                            f"Drag Diffusion failed: {type(exc).__name__}: {exc}")
    finally:
        feedback.close()
        if client is not None:  # the edit ended before it took the dialog's connection
            if preparer is not None:
                preparer.cancel(client)
            client.close()
        if interactive:  # GIMP keeps these as the last values: -1 = the method's default
            for prop, value in par.stored_values(table, config.get_property("method"),
                                                 knob_values(config)).items():
                knob = par.KNOB_BY_PROP[prop]
                config.set_property(prop, round(value) if knob.is_int else value)
    if interactive:  # GIMP now keeps these values itself; nothing typed is pending
        par.write_state(state_path, typed=None)
    layer = info.pop("layer")
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
        help_dir = Gio.File.new_for_path(os.path.join(HERE, "help"))
        self.set_help_domain(HELP_DOMAIN, help_dir)
        return [PROC_NAME]

    def do_create_procedure(self, name: str) -> Gimp.Procedure:
        install = backend.InstallInfo.load()
        table = par.ParamTable.parse(install.parameters, "install.json")
        p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run, None)
        p.set_image_types("RGB*, GRAY*")
        p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        p.set_menu_label("Drag Diffusion…")
        p.add_menu_path("<Image>/Filters/Generic")
        p.set_documentation(
            "Move image content along drags with a diffusion model",
            "Draw a path whose anchors come in pairs — handle (the point to move), then its "
            "target — either one two-anchor stroke per drag or handle, target, handle, target "
            "in one stroke. With Inpaint4Drag, select the region that moves (the object); the "
            "dialog previews the warp, OK inpaints what it leaves behind. With DragDiffusion "
            "or GoodDrag, optionally select the area that may change. The result is added as a "
            "new layer above the selected layer; one Undo removes it. From scripts, a numeric "
            "setting at -1 uses the chosen method's default.", name)
        p.set_attribution("GIMP Drag Diffusion contributors", "GPL-3.0-or-later", "2025")

        methods = Gimp.Choice.new()
        names = list(table.methods) if table else list(FALLBACK_METHODS)
        for number, method in enumerate(names):
            methods.add(method, number, par.method_label(method),
                        table.describe(method) if table else "")
        default = table.default_method if table and table.default_method in names else names[0]
        p.add_choice_argument("method", "_Method", "Drag algorithm and its settings",
                              methods, default, RW)
        p.add_string_argument("prompt", "_Prompt", "What the image shows (optional; helps "
                              "the model)", "", RW)
        p.add_int_argument("seed", "S_eed", "Random seed", 0, 2**31 - 1, 42, RW)
        for knob in par.KNOBS:
            spec = table.specs.get(knob.param) if table else None
            blurb = (spec.help if spec and spec.help else knob.nick) + \
                " (-1: the method's default)"
            if knob.is_int:
                p.add_int_argument(knob.prop, knob.nick, blurb, par.DEFAULT, int(knob.pdb_max),
                                   par.DEFAULT, RW)
            else:
                p.add_double_argument(knob.prop, knob.nick, blurb, par.DEFAULT, knob.pdb_max,
                                      par.DEFAULT, RW)
        p.add_string_argument("advanced", "Other settings (_JSON)",
                              'More engine parameters as a JSON object, e.g. {"r_m": 1, '
                              '"feather": 5}', "", RW)
        p.add_string_argument("backend", "_Backend",
                              "Connection file of the backend (empty: the default one)", "", RW)
        p.add_int_argument("timeout", "_Timeout (s)", "How long to wait for the backend to "
                           "answer or start", 1, 3600, 120, RW)
        p.add_boolean_argument("make-path", "Add a path with the trac_ked handles",
                               "Also add a path from each handle's final position to its "
                               "target", False, RW)
        p.add_layer_return_value("new-layer", "New layer", "The result layer", True, RW)
        p.add_string_return_value("info", "Info", "JSON: drags, final handle positions, "
                                  "timings", "", RW)
        return p


Gimp.main(DragDiffusion.__gtype__, sys.argv)

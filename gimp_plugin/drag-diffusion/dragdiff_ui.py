"""The plug-in's windows: the settings dialog and the progress window with its live preview.

Both run in the plug-in's main thread; the progress window is pumped by the backend
conversation's ``Feedback.idle`` calls while it waits. The logic they show (defaults, ranges,
estimates, times) lives in the pure modules dragdiff_params and dragdiff_progress.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dragdiff_backend as backend
import dragdiff_layer as lay
import dragdiff_models as models
import dragdiff_params as par
import dragdiff_preview as pre
import dragdiff_progress as prog
import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gtk", "3.0")
gi.require_version("GdkPixbuf", "2.0")
from gi.repository import GdkPixbuf, Gimp, GimpUi, GLib, GObject, Gtk  # noqa: E402

PREVIEW_BOX = 256  # the preview's longest side on screen, pixels
MAIN = ("method", "method-help", "prompt", "seed",
        *(k.prop for k in par.KNOBS if not k.advanced), "estimate", "prepare-status", "notice",
        "advanced-expander")
ADVANCED = (*(k.prop for k in par.KNOBS if k.advanced), "advanced", "backend", "timeout",
            "make-path")
@dataclass
class DialogContext:
    """What the settings dialog shows besides the procedure's arguments."""

    table: par.ParamTable | None
    info: dict[str, Any] | None  # the backend's hello (live or remembered); None: unknown
    running: bool  # the backend answered just now
    layer_size: tuple[int, int]
    state_path: Path
    state: dict[str, Any] = field(default_factory=dict)
    start_command: str | None = None  # how to start the backend when the plug-in can't
    # The live warp preview (Inpaint4Drag): the backend link and what reads the scaled inputs
    # (raises an InputError-like exception with a line for the user).
    link: backend.PreviewLink | None = None
    read_preview: Callable[[], pre.PreviewInputs] | None = None
    # The prepare (protocol 1.2) sent while the dialog is open, and whether the image has a
    # selection now (what DragDiffusion's prepared reference depends on).
    preparer: backend.Preparer | None = None
    has_selection: Callable[[], bool] = lambda: True


class SettingsDialog:
    """GIMP's procedure dialog with real defaults that follow the method, one line about the
    chosen method, the expected time, and notices (demo model, backend not running)."""

    def __init__(self, procedure: Gimp.Procedure, config: Gimp.ProcedureConfig,
                 context: DialogContext) -> None:
        self.config = config
        self.context = context
        self.table = context.table
        for name in STRINGS:  # GIMP may hand an empty string over as None
            if config.get_property(name) is None:
                config.set_property(name, "")
        typed = context.state.get("typed")
        if isinstance(typed, dict):
            restore(config, typed)
        self.method = config.get_property("method")
        if self.table is not None:
            set_knobs(config, par.shown_values(self.table, self.method, knob_values(config)))
        self.method_help = self.estimate = self.notice = self.prepare_status = None
        self.widgets: dict[str, Gtk.Widget] = {}
        # Follows the method, and turns a knob's -1 (the factory value, e.g. after Reset) into
        # the method's real default.
        self._notify = config.connect("notify", self._changed)
        self.dialog = GimpUi.ProcedureDialog.new(procedure, config, "Drag Diffusion")
        self.method_help = self._label("method-help")
        self.estimate = self._label("estimate")
        self.prepare_status = self._label("prepare-status")
        self.prepare_status.get_style_context().add_class("dim-label")
        self.notice = self._label("notice")
        self._tune_knobs()
        self.dialog.get_label("advanced-title", "Advanced", False, False)
        self.dialog.fill_box("advanced-box", list(ADVANCED))
        self.dialog.fill_expander("advanced-expander", "advanced-title", False, "advanced-box")
        self.dialog.fill(list(MAIN))
        self.models = ModelsPanel(self)
        self.preview = WarpPreview(self) if context.read_preview is not None else None
        self._prepare_timer = (GLib.timeout_add(pre.POLL_MS, self._prepare_tick)
                               if context.preparer is not None else None)
        self._update()

    def _label(self, name: str) -> Gtk.Label:
        label = self.dialog.get_label(name, "", False, False)
        label.set_line_wrap(True)
        label.set_max_width_chars(56)
        label.set_xalign(0.0)
        return label

    def _tune_knobs(self) -> None:
        """Each knob's range, step and digits from the backend's specs; help as tooltip."""
        if self.table is None:
            return
        for knob in par.KNOBS:
            widget = self.dialog.get_widget(knob.prop, GObject.TYPE_NONE)
            if not isinstance(widget, GimpUi.LabelSpin):
                continue
            self.widgets[knob.prop] = widget
            lower, upper, step = self.table.knob_range(knob)
            digits = 0 if knob.is_int else max(1, -math.floor(math.log10(step)))
            widget.set_digits(digits)
            widget.set_property("lower", lower)
            widget.set_property("upper", upper)
            widget.set_increments(step, step * 10)
            spec = self.table.specs.get(knob.param)
            if spec and spec.help:
                widget.set_tooltip_text(spec.help)

    def _changed(self, config: Gimp.ProcedureConfig, pspec: GObject.ParamSpec) -> None:
        knob = par.KNOB_BY_PROP.get(pspec.name)
        if self.table is not None and knob is not None and config.get_property(knob.prop) < 0:
            set_knobs(config, par.shown_values(self.table, self.method, knob_values(config)))
            return  # setting it notified again
        if pspec.name == "method":
            new = config.get_property("method")
            if self.table is not None and new != self.method:
                values = par.follow_method(self.table, self.method, new, knob_values(config))
                with config.handler_block(self._notify):
                    set_knobs(config, values)
            self.method = new
        self._update()

    def _update(self) -> None:
        if self.notice is None:  # the dialog is being built
            return
        table, info = self.table, self.context.info or {}
        for knob in par.KNOBS:  # a knob the chosen algorithm does not use is greyed out
            if knob.prop in self.widgets and table is not None:
                self.widgets[knob.prop].set_sensitive(table.uses(knob, self.method))
        self.method_help.set_text(table.describe(self.method) if table else "")
        self.method_help.set_visible(bool(self.method_help.get_text()))
        self.estimate.set_text(self._estimate_text(table, info))
        self.estimate.set_visible(bool(self.estimate.get_text()))
        notices = []
        if self.context.info and backend.is_demo_model(self.context.info):
            notices.append(backend.demo_notice(self.context.info))
        if not self.context.running and self.context.start_command:
            notices.append("The backend is not running, and the plug-in can't start it from "
                           f"here: start it with {self.context.start_command}")
        elif not self.context.running:
            notices.append("The backend is not running: it starts when you press OK (loading "
                           "the model takes a minute or more the first time).")
        if table is None:
            notices.append("The method defaults are unknown (no backend answered and "
                           "install.json has no table): settings at -1 use them.")
        self.notice.set_text("\n".join(notices))
        self.notice.set_visible(bool(notices))
        if getattr(self, "models", None) is not None:
            self.models.look()
        if getattr(self, "preview", None) is not None:
            self.preview.look()

    def take_info(self, info: dict[str, Any]) -> None:
        """The backend's hello after a download: its models and methods as they are now (the
        method that needed the set runs on it, no restart)."""
        before = (self.context.info or {}).get("model")
        self.context.info, self.context.running = info, True
        if self.context.preparer is not None and info.get("model") != before:
            self.context.preparer.forget()  # it prepared on the models served before
        par.write_state(self.context.state_path, hello=info)
        table = par.load_table(info, {}, {})
        if table is not None:
            self.table = self.context.table = table
        self._update()

    def _estimate_text(self, table: par.ParamTable | None, info: dict[str, Any]) -> str:
        if table is None or not info.get("device"):
            return ""
        try:
            sent = par.overrides(knob_values(self.config), text(self.config, "advanced"))
        except par.ParamsError:
            sent = {}
        resolved = table.resolved(self.method, sent)
        device = str(info["device"])
        model = str((info.get("model") or {}).get("name") or "")
        measured = (self.context.state.get("speeds") or {}).get(prog.speed_key(device, model))
        speed = measured if measured is not None else (
            None if backend.is_demo_model(info) else prog.first_guess(device))
        mpx = prog.working_megapixels(*self.context.layer_size, par.working_width(resolved),
                                      resolved.get("work_max_side", 0))
        seconds = prog.estimate_seconds(prog.plan_steps(resolved), mpx, speed,
                                        prog.step_costs(resolved))
        if pre.region_moves(table.algorithm(self.method)):
            return prog.inpaint_advice(seconds if measured is not None else None, device)
        return prog.advice(seconds, device, par.working_width(resolved),
                           measured is not None, "fast" in table.methods)

    def _prepare_settings(self) -> backend.PrepareSettings | None:
        """What the prepare sends for the values the dialog shows (None: not valid yet)."""
        try:
            params = par.overrides(knob_values(self.config), text(self.config, "advanced"))
        except par.ParamsError:
            return None
        algorithm = self.table.algorithm(self.method) if self.table else self.method
        return backend.PrepareSettings(
            self.method, algorithm, tuple(sorted(params.items())),
            text(self.config, "prompt"), int(self.config.get_property("seed")),
            bool(self.context.has_selection()))

    def _prepare_tick(self) -> bool:
        """Send the prepare when the settings settled, read its progress, show it."""
        preparer = self.context.preparer
        settings = self._prepare_settings()
        if settings is not None:
            preparer.look(settings)
        preparer.poll()
        line = preparer.status()
        self.prepare_status.set_text(line)
        self.prepare_status.set_visible(bool(line))
        return self._prepare_timer is not None

    def run(self) -> bool:
        """Show the dialog; remember what it holds until an edit with it succeeds (GIMP keeps
        only a successful run's values, so a Cancel would lose what was typed)."""
        ok = bool(self.dialog.run())
        self.models.stop()
        if self._prepare_timer is not None:
            GLib.source_remove(self._prepare_timer)
            self._prepare_timer = None
        if self.preview is not None:
            self.preview.stop()
        self.config.disconnect(self._notify)
        typed = snapshot(self.config)
        typed.update(par.stored_values(self.table, self.method, knob_values(self.config)))
        par.write_state(self.context.state_path, typed=typed)
        self.dialog.destroy()
        return ok


class ModelsPanel:
    """The dialog's model lines (protocol 1.3): each model set the chosen method could run on
    that is not installed, with a Download button; while the backend downloads one, a progress
    bar (bytes, rate, time left) and Cancel; when it is installed, the backend's hello again, so
    the method runs on it at once. The backend downloads; the dialog only asks and shows."""

    POLL_MS = 200  # how often a download's events are read

    def __init__(self, owner: SettingsDialog) -> None:
        self.owner = owner
        self.job: str | None = None  # the download followed, its set and title
        self.set_name = self.title = ""
        self._timer: int | None = None
        self._shown: tuple[Any, ...] | None = None
        self.box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=4)
        self.rows = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=4)
        self.bar = Gtk.ProgressBar(show_text=True)
        self.status = Gtk.Label(xalign=0.0)
        self.status.set_line_wrap(True)
        self.status.set_max_width_chars(56)
        self.cancel = Gtk.Button.new_with_label("Cancel download")
        self.cancel.connect("clicked", lambda *_: self._cancel())
        self.box.pack_start(self.rows, False, False, 0)
        self.box.pack_start(self.bar, False, False, 0)
        self.box.pack_start(self.status, False, False, 0)
        self.box.pack_start(self.cancel, False, False, 0)
        owner.dialog.get_content_area().pack_start(self.box, False, False, 0)
        self.box.show_all()
        self.bar.hide()
        self.cancel.hide()
        self.status.hide()
        self._follow_running()

    @property
    def link(self) -> backend.PreviewLink | None:
        return self.owner.context.link

    def _algorithm(self) -> str:
        table = self.owner.table
        return table.algorithm(self.owner.method) if table else self.owner.method

    def _follow_running(self) -> None:
        """A download already under way (asked by an earlier dialog): show it."""
        if self.link is None or not self.link.can_download:
            return
        for line in models.missing_lines(self.link.info, self._algorithm()):
            if line.download_job:
                self._follow(line.download_job, line.name, line.title)
                return

    def look(self) -> None:
        """Show the lines for the chosen method (again only when they changed)."""
        info = self.owner.context.info
        if self.link is not None and self.link.info is not None:
            info = self.link.info
        lines = [dataclasses.replace(line, state="downloading") if line.name == self.set_name
                 and self.job is not None else line
                 for line in models.missing_lines(info, self._algorithm())]
        can = self.link is not None and self.link.can_download
        key = (tuple(lines), can, self.job)
        if key == self._shown:
            return
        self._shown = key
        for child in self.rows.get_children():
            self.rows.remove(child)
            child.destroy()
        if lines:
            heading = Gtk.Label(xalign=0.0)
            heading.set_markup(
                f"<b>{GLib.markup_escape_text(models.heading_text(self.owner.method))}</b>")
            self.rows.pack_start(heading, False, False, 0)
        for line in lines:
            self.rows.pack_start(self._row(line, can), False, False, 0)
        self.rows.show_all()

    def _row(self, line: models.SetLine, can: bool) -> Gtk.Widget:
        row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        label = Gtk.Label(label=line.text() if can else models.manual_text(line), xalign=0.0)
        label.set_line_wrap(True)
        label.set_max_width_chars(44)
        row.pack_start(label, True, True, 0)
        if can:
            button = Gtk.Button.new_with_mnemonic("Down_load")
            button.set_name(f"download-{line.name}")
            button.set_sensitive(self.job is None)
            button.connect("clicked", lambda *_: self._download(line))
            row.pack_end(button, False, False, 0)
        return row

    def _download(self, line: models.SetLine) -> None:
        try:
            job = self.link.download(line.name)
        except backend.BackendError as exc:
            self._say(str(exc))
            return
        self._follow(job, line.name, line.title)

    def _follow(self, job: str, name: str, title: str) -> None:
        self.job, self.set_name, self.title = job, name, title
        self.bar.set_fraction(0.0)
        self.bar.set_text(f"{title}: starting…")
        self.bar.show()
        self.cancel.set_sensitive(True)
        self.cancel.show()
        self._say("")
        self.look()
        if self._timer is None:
            self._timer = GLib.timeout_add(self.POLL_MS, self._tick)

    def _tick(self) -> bool:
        if self.job is None or self.link is None or self.link.client is None:
            self._timer = None
            return False
        try:
            events = self.link.download_events(self.job)
        except backend.BackendError as exc:
            self._end(f"The download of {self.title} failed: {exc}")
            return False
        for event in events:
            if event.type == "progress":
                fraction, line = models.progress_text(event.content)
                if fraction is None:
                    self.bar.pulse()
                else:
                    self.bar.set_fraction(fraction)
                self.bar.set_text(line)
            elif event.type == "installed":
                self._installed(event.content)
                return False
            elif event.type == "cancelled":
                self._end(models.cancelled_text(self.title))
                return False
        return True

    def _installed(self, content: dict[str, Any]) -> None:
        self._end(models.installed_text(content, self.title))  # (asks hello again)
        if self.link is not None and self.link.info is not None:
            self.owner.take_info(dict(self.link.info))

    def _cancel(self) -> None:
        if self.job is None or self.link is None:
            return
        self.cancel.set_sensitive(False)
        self.bar.set_text("Cancelling…")
        try:
            self.link.cancel_download(self.job)
        except backend.BackendError as exc:
            self._end(str(exc))

    def _end(self, text: str) -> None:
        self.job, self._timer = None, None
        self.bar.hide()
        self.cancel.hide()
        self._say(text)
        self._shown = None
        try:
            if self.link is not None and self.link.client is not None:
                self.link.refresh()
        except backend.BackendError:
            pass
        self.look()

    def _say(self, text: str) -> None:
        self.status.set_text(text)
        self.status.set_visible(bool(text))

    def stop(self) -> None:
        """The dialog closes: stop reading (a download goes on in the backend; the next dialog
        shows it again)."""
        if self._timer is not None:
            GLib.source_remove(self._timer)
            self._timer = None


class WarpPreview:
    """The dialog's live Inpaint4Drag preview: the warped layer with the area to inpaint as a
    grid, shown when the dialog opens and again whenever the drags, the selection or the
    settings change (looked for every ``pre.POLL_MS``)."""

    def __init__(self, owner: SettingsDialog) -> None:
        self.owner = owner
        self.state = pre.PreviewState()
        self.picture = Gtk.Image()
        self.picture.set_size_request(PREVIEW_BOX, PREVIEW_BOX)
        self.caption = Gtk.Label(xalign=0.0)
        self.caption.set_line_wrap(True)
        self.caption.set_max_width_chars(56)
        self.caption.get_style_context().add_class("dim-label")
        box = owner.dialog.get_content_area()
        box.pack_start(self.picture, False, False, 0)
        box.pack_start(self.caption, False, False, 0)
        self.picture.show()
        self.caption.show()
        self._timer = GLib.timeout_add(pre.POLL_MS, self._tick)
        GLib.idle_add(self._first)  # within a second of opening: as soon as it is drawn

    def _first(self) -> bool:
        self.look()
        return False

    def _tick(self) -> bool:
        self.look()
        return self._timer is not None

    def stop(self) -> None:
        if self._timer is not None:
            GLib.source_remove(self._timer)
            self._timer = None

    def _say(self, text: str, clear: bool = True) -> None:
        if clear:
            self.picture.clear()
            self.state.forget()
        self.caption.set_text(text)

    def look(self) -> None:
        """Ask for a new warp when what it depends on changed."""
        owner, context = self.owner, self.owner.context
        table = owner.table
        algorithm = table.algorithm(owner.method) if table else owner.method
        if not pre.region_moves(algorithm):
            self._say(pre.NOT_INPAINT4DRAG)
            return
        link = context.link
        if link is None or link.client is None:
            self._say(pre.NO_BACKEND)
            return
        if not link.can_warp:
            self._say(pre.OLD_BACKEND)
            return
        try:
            inputs = context.read_preview()
            params = par.overrides(knob_values(owner.config), text(owner.config, "advanced"))
        except Exception as exc:  # an InputError or ParamsError: its text is for the user
            self._say(str(exc))
            return
        if not self.state.changed(inputs.key(), owner.method, params):
            return
        try:
            pixels, figures = link.warp(inputs, params)
        except backend.BackendError as exc:
            self._say(str(exc))
            return
        rgb = lay.preview_rgb(pixels, inputs.width, inputs.height, inputs.channels)
        pixbuf = GdkPixbuf.Pixbuf.new_from_bytes(
            GLib.Bytes.new(rgb), GdkPixbuf.Colorspace.RGB, False, 8, inputs.width,
            inputs.height, inputs.width * 3)
        shown = lay.fit(inputs.width, inputs.height, PREVIEW_BOX)
        self.picture.set_from_pixbuf(pixbuf.scale_simple(*shown, GdkPixbuf.InterpType.BILINEAR))
        scale = inputs.width / max(1, owner.context.layer_size[0])
        self.caption.set_text(pre.caption(figures, scale))


# --- config helpers -------------------------------------------------------------------------------

STRINGS = ("prompt", "advanced", "backend")
REMEMBERED = ("method", "seed", "timeout", "make-path", *STRINGS, *(k.prop for k in par.KNOBS))


def knob_values(config: Gimp.ProcedureConfig) -> dict[str, float]:
    return {k.prop: float(config.get_property(k.prop)) for k in par.KNOBS}


def set_knobs(config: Gimp.ProcedureConfig, values: dict[str, float]) -> None:
    for knob in par.KNOBS:
        if knob.prop in values:
            value = values[knob.prop]
            config.set_property(knob.prop, round(value) if knob.is_int else float(value))


def snapshot(config: Gimp.ProcedureConfig) -> dict[str, Any]:
    values = {name: config.get_property(name) for name in REMEMBERED}
    return {k: "" if v is None and k in STRINGS else v for k, v in values.items()}


def restore(config: Gimp.ProcedureConfig, values: dict[str, Any]) -> None:
    """Put remembered dialog values back (unknown or invalid ones are skipped)."""
    for name, value in values.items():
        if name not in REMEMBERED:
            continue
        knob = par.KNOB_BY_PROP.get(name)
        try:
            if knob is not None:
                value = round(value) if knob.is_int else float(value)
            config.set_property(name, value)
        except (TypeError, ValueError):
            continue


def text(config: Gimp.ProcedureConfig, name: str) -> str:
    """A string argument; GIMP hands back None for an empty string in some paths."""
    return config.get_property(name) or ""


# --- progress -------------------------------------------------------------------------------------

class ProgressWindow(backend.Feedback):
    """A window with phase, times, a live preview, notices and Cancel, beside GIMP's status
    bar (``status``). Nothing of it stays behind: it is destroyed at the end."""

    def __init__(self, status: backend.Feedback) -> None:
        self.status = status
        self._cancelled = False
        self._last: tuple[Any, ...] = ()
        self._notices: list[str] = []
        self.previews = 0
        self.dialog = GimpUi.Dialog(title="Drag Diffusion – working", role="drag-diffusion")
        self.dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
        self.dialog.connect("response", lambda *_: self._cancel())
        self.dialog.connect("delete-event", lambda *_: self._cancel() or True)
        box = self.dialog.get_content_area()
        box.set_border_width(12)
        box.set_spacing(6)
        self.phase = Gtk.Label(label="Connecting to the backend…", xalign=0.0)
        self.bar = Gtk.ProgressBar(show_text=True)
        self.bar.set_size_request(PREVIEW_BOX + 104, -1)
        self.picture = Gtk.Image()
        self.picture.set_size_request(PREVIEW_BOX, PREVIEW_BOX)
        self.caption = Gtk.Label(label="The preview appears once the edit takes shape.",
                                 xalign=0.5)
        self.caption.get_style_context().add_class("dim-label")
        self.notes = Gtk.Label(xalign=0.0)
        self.notes.set_line_wrap(True)
        self.notes.set_max_width_chars(52)
        for widget in (self.phase, self.bar, self.picture, self.caption, self.notes):
            box.pack_start(widget, False, False, 0)
        self.dialog.show_all()
        self.notes.hide()

    def _cancel(self) -> None:
        self._cancelled = True
        self.phase.set_text("Cancelling…")

    def progress(self, fraction: float | None, text: str, detail: str = "") -> None:
        self.status.progress(fraction, text, detail)
        if (fraction, text, detail) == self._last or self.dialog is None:
            return
        self._last = (fraction, text, detail)
        if not self._cancelled:
            self.phase.set_text(text)
            if fraction is None:
                self.bar.pulse()
                self.bar.set_text(detail or " ")
            else:
                self.bar.set_fraction(fraction)
                self.bar.set_text(f"{fraction:.0%} · {detail}" if detail else f"{fraction:.0%}")
        self.idle()

    def preview(self, pixels: bytes, width: int, height: int, channels: int) -> None:
        if self.dialog is None:
            return
        rgb = lay.preview_rgb(pixels, width, height, channels)
        pixbuf = GdkPixbuf.Pixbuf.new_from_bytes(GLib.Bytes.new(rgb), GdkPixbuf.Colorspace.RGB,
                                                 False, 8, width, height, width * 3)
        shown = lay.fit(width, height, PREVIEW_BOX)
        self.picture.set_from_pixbuf(pixbuf.scale_simple(*shown, GdkPixbuf.InterpType.BILINEAR))
        self.previews += 1
        self.caption.set_text("Live preview (rough colours; the result is decoded properly)")
        self.idle()

    def notice(self, text: str) -> None:
        if text in self._notices or self.dialog is None:
            return
        self._notices.append(text)
        self.notes.set_text("\n".join(self._notices))
        self.notes.show()
        self.idle()

    def cancelled(self) -> bool:
        return self._cancelled

    def idle(self) -> None:
        if self.dialog is not None:
            while Gtk.events_pending():
                Gtk.main_iteration_do(False)

    def close(self) -> None:
        self.status.close()
        if self.dialog is not None:
            self.dialog.destroy()
            self.idle()
            self.dialog = None

# Runs inside GIMP's GUI (gimp-3.0 under Xvfb, python-fu-eval batch code).
# Variables set by the host: STATE (folder inside the chroot), ARGS (plug-in arguments of the
# quick edit), FIRST (arguments of the first interactive run: a long GoodDrag-able job), SCENE
# (the picture to load, the selection rectangle and the drags).
#
# Each step below waits for the host, which watches the windows, screenshots them and presses
# keys; each step's outcome is written to STATE/<step> (JSON):
#   run0    interactive with a connection file nobody answers: the dialog says so; cancelled
#           (then what it remembered is forgotten, so run1 starts from the call's values)
#   run1    interactive: the dialog (help, method change, a typed seed), then a long job with
#           live previews, cancelled from the progress window
#   run2    interactive again (as Re-Show): the values typed before the cancel are back;
#           the dialog is cancelled
#   run4    interactive long job cancelled from GIMP's status bar (GIMP kills the plug-in)
#   run3    interactive with a path whose stroke has 3 anchors, after Reset to Factory
#           Defaults in the dialog: an error, shown once
#   applied non-interactive quick edit: one layer in one undo group; then the host presses
#           Ctrl+Z, Ctrl+Z, Ctrl+Y while STATE/state.json reports the layers every 0.2 s
import hashlib
import json
import os
import time

from gi.repository import Gegl, Gimp, Gio

STATE: str = globals()["STATE"]
ARGS: dict = globals()["ARGS"]
FIRST: dict = globals()["FIRST"]
SCENE: dict = globals()["SCENE"]
DEAD: str = globals()["DEAD"]  # a connection file of a backend that is not running


def mark(name, data=None):
    tmp = os.path.join(STATE, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data or {}, f)
    os.replace(tmp, os.path.join(STATE, name))


def snapshot(image):
    """The layers' names and pixel hashes, or None while GIMP is taking a layer away (an undo
    under way: GIMP 3.2 lists it with no buffer for a moment)."""
    layers = []
    for layer in image.get_layers():
        w, h = layer.get_width(), layer.get_height()
        buffer = layer.get_buffer()
        if buffer is None:
            return None
        pixels = buffer.get(Gegl.Rectangle.new(0, 0, w, h), 1.0, "R'G'B'A u8",
                            Gegl.AbyssPolicy.NONE)
        layers.append([layer.get_name(), hashlib.sha1(pixels).hexdigest()])
    return layers


def settled_snapshot(image, seconds=10):
    """``snapshot`` once GIMP has no layer half taken away."""
    deadline = time.monotonic() + seconds
    while (layers := snapshot(image)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return layers


def report_until(marker, seconds=180):
    deadline = time.monotonic() + seconds
    while not os.path.exists(os.path.join(STATE, marker)) and time.monotonic() < deadline:
        layers = snapshot(image)
        if layers is not None:  # else read again at the next tick
            mark("state.json", {"layers": layers, "time": time.time()})
        time.sleep(0.2)


image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(SCENE["image"]))
layer = image.get_layers()[0]
layer.set_name("Background")
image.select_rectangle(Gimp.ChannelOps.REPLACE, *SCENE["selection"])
drags = Gimp.Path.new(image, "drags")
image.insert_path(drags, None, 0)
for (hx, hy), (tx, ty) in SCENE["drags"]:
    drags.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, [hx, hy] * 3 + [tx, ty] * 3, False)
bad = Gimp.Path.new(image, "three anchors")
image.insert_path(bad, None, 0)
bad.stroke_new_from_points(Gimp.PathStrokeType.BEZIER,
                           [10, 10] * 3 + [20, 10] * 3 + [30, 10] * 3, False)
image.set_selected_paths([drags])
image.set_selected_layers([layer])
image.undo_disable()
image.undo_enable()  # an empty undo history: every step in it is the plug-in's
image.clean_all()
Gimp.Display.new(image)
Gimp.displays_flush()
original = settled_snapshot(image)
mark("ready", {"layers": original})

pdb = Gimp.get_pdb()
procedure = pdb.lookup_procedure("python-fu-drag-diffusion")


def call(run_mode, args):
    config = procedure.create_config()
    config.set_property("run-mode", run_mode)
    config.set_property("image", image)
    config.set_core_object_array("drawables", [layer])
    for name, value in args.items():
        config.set_property(name, value)
    started = time.time()
    result = procedure.run(config)
    status = result.index(0)
    out = {"status": status.value_nick, "started": started, "ended": time.time(),
           "error": pdb.get_last_error() if status != Gimp.PDBStatusType.SUCCESS else None,
           "layers": settled_snapshot(image)}
    if status == Gimp.PDBStatusType.SUCCESS:
        out["info"] = json.loads(result.index(2))
    return out


mark("run0", call(Gimp.RunMode.INTERACTIVE, {**ARGS, "backend": DEAD}))
settings = os.path.join(Gimp.directory(), "plug-in-settings", "drag-diffusion-state.json")
with open(settings) as f:
    remembered = json.load(f)
remembered.pop("typed", None)
with open(settings, "w") as f:
    json.dump(remembered, f)
mark("run1", call(Gimp.RunMode.INTERACTIVE, FIRST))
mark("run2", call(Gimp.RunMode.INTERACTIVE, ARGS))
mark("run4", call(Gimp.RunMode.INTERACTIVE, ARGS))
image.set_selected_paths([bad])
mark("run3", call(Gimp.RunMode.INTERACTIVE, ARGS))
image.set_selected_paths([drags])
mark("run5", call(Gimp.RunMode.INTERACTIVE, {**ARGS, "method": "inpaint4drag"}))
applied = call(Gimp.RunMode.NONINTERACTIVE, ARGS)
mark("applied", {**applied, "original": original})
report_until("done")

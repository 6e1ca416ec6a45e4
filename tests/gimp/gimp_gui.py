# Runs inside GIMP's GUI (gimp-3.0 under Xvfb, python-fu-eval batch code).
# Variables set by the host: STATE (folder inside the chroot), ARGS (plug-in arguments).
#
# 1. Opens an image with a selection and a two-stroke path in a display.
# 2. Runs the plug-in INTERACTIVELY: its dialog shows; the host screenshots it and presses OK;
#    the progress dialog shows; the host screenshots it and cancels the job with Escape.
# 3. Runs the plug-in non-interactively (it adds one layer in one undo group).
# 4. Reports the layer list and pixel checksums to STATE/state.json every 0.2 s while the host
#    presses Ctrl+Z and Ctrl+Y, until the host creates STATE/done.
import hashlib
import json
import os
import time

from gi.repository import Gegl, Gimp

STATE: str = globals()["STATE"]
ARGS: dict = globals()["ARGS"]


def mark(name, data=None):
    tmp = os.path.join(STATE, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data or {}, f)
    os.replace(tmp, os.path.join(STATE, name))


def snapshot(image):
    layers = []
    for layer in image.get_layers():
        w, h = layer.get_width(), layer.get_height()
        pixels = layer.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0, "R'G'B'A u8",
                                        Gegl.AbyssPolicy.NONE)
        layers.append([layer.get_name(), hashlib.sha1(pixels).hexdigest()])
    return layers


W, H = 64, 48
image = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
layer = Gimp.Layer.new(image, "Background", W, H, Gimp.ImageType.RGBA_IMAGE, 100.0,
                       Gimp.LayerMode.NORMAL)
image.insert_layer(layer, None, 0)
data = bytearray()
for y in range(H):
    for x in range(W):
        data += bytes(((x * 4) % 256, (y * 5) % 256, ((x + y) * 3) % 256, 255))
buffer = layer.get_buffer()
buffer.set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B'A u8", bytes(data))
buffer.flush()
image.select_rectangle(Gimp.ChannelOps.REPLACE, 8, 6, 40, 30)
path = Gimp.Path.new(image, "drags")
image.insert_path(path, None, 0)
for (hx, hy), (tx, ty) in (((12, 12), (18, 14)), ((30, 20), (34, 26))):
    path.stroke_new_from_points(Gimp.PathStrokeType.BEZIER,
                                [hx, hy] * 3 + [tx, ty] * 3, False)
image.set_selected_layers([layer])
image.clean_all()
Gimp.Display.new(image)
Gimp.displays_flush()
original = snapshot(image)
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
    result = procedure.run(config)
    return result.index(0).value_nick


# A job long enough to cancel by hand: 500 drag steps that never stop early (reach threshold 0;
# random weights otherwise "reach" their targets within a few steps).
LONG = {**ARGS, "drag-steps": 500,
        "advanced": json.dumps({**json.loads(ARGS.get("advanced") or "{}"), "reach_threshold": 0})}
mark("dialog-closed", {"status": call(Gimp.RunMode.INTERACTIVE, LONG), "layers": snapshot(image)})
status = call(Gimp.RunMode.NONINTERACTIVE, ARGS)
mark("applied", {"status": status, "error": pdb.get_last_error(), "original": original,
                 "layers": snapshot(image)})
deadline = time.monotonic() + 180
while not os.path.exists(os.path.join(STATE, "done")) and time.monotonic() < deadline:
    mark("state.json", {"layers": snapshot(image), "time": time.time()})
    time.sleep(0.2)

# Runs inside GIMP's GUI (gimp-3.0 under Xvfb, python-fu-eval batch code) for the dialog's
# model download (issue 24). Variables set by the host: STATE (folder inside the chroot), ARGS
# (the plug-in's arguments: DragDiffusion, whose model set the backend lacks), SCENE (the
# picture, the selection and the drags).
#
#   dialog  interactive: the host presses the dialog's Download button, watches the download's
#           progress, screenshots it, then cancels the dialog (nothing is edited)
import json
import os

from gi.repository import Gimp, Gio

STATE: str = globals()["STATE"]
ARGS: dict = globals()["ARGS"]
SCENE: dict = globals()["SCENE"]


def mark(name, data=None):
    tmp = os.path.join(STATE, name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data or {}, f)
    os.replace(tmp, os.path.join(STATE, name))


image = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(SCENE["image"]))
layer = image.get_layers()[0]
image.select_rectangle(Gimp.ChannelOps.REPLACE, *SCENE["selection"])
drags = Gimp.Path.new(image, "drags")
image.insert_path(drags, None, 0)
for (hx, hy), (tx, ty) in SCENE["drags"]:
    drags.stroke_new_from_points(Gimp.PathStrokeType.BEZIER, [hx, hy] * 3 + [tx, ty] * 3, False)
image.set_selected_paths([drags])
image.set_selected_layers([layer])
Gimp.Display.new(image)
Gimp.displays_flush()
mark("ready")

# What an earlier dialog left typed (the tier's other GUI tests end on Inpaint4Drag) would open
# the dialog instead of ARGS: forget it, so the dialog opens on DragDiffusion's missing set.
settings = os.path.join(Gimp.directory(), "plug-in-settings", "drag-diffusion-state.json")
if os.path.exists(settings):
    with open(settings) as f:
        remembered = json.load(f)
    remembered.pop("typed", None)
    with open(settings, "w") as f:
        json.dump(remembered, f)

pdb = Gimp.get_pdb()
procedure = pdb.lookup_procedure("python-fu-drag-diffusion")
config = procedure.create_config()
config.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
config.set_property("image", image)
config.set_core_object_array("drawables", [layer])
for name, value in ARGS.items():
    config.set_property(name, value)
result = procedure.run(config)
mark("dialog", {"status": result.index(0).value_nick, "layers": len(image.get_layers())})

"""Vision helpers that need no torch: the synthetic image and question generator for vlm-1."""

#: The bundled demo vision model's name (ListModels shows it).
VLM1_NAME = "vlm-1"
#: What the bundled model knows, said wherever it is offered (engine, server, workbench).
VLM1_DOMAIN = ("vlm-1 is a small demo model trained only on synthetic pictures of circles, "
               "squares and triangles in seven colours: it answers about colour, shape, "
               "position and count of such shapes, not about photos")

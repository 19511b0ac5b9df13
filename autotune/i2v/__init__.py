"""Image-to-video generation on compiled artifacts (or torch eager): the pipeline, its image
feature cache and step cache, image and video files.

May import: support, models, frontend, build, runtime.
"""

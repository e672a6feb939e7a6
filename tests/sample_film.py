"""The storyboard the storyboard and plan tests share: cuts, a continuation, a branch, an image shot."""

# Window = 17 frames = 5 latents; overlap 5 frames = 2 latents handed on. Windows [prefix+new(+suffix)]:
#   open: fresh, 25 frames = 7 latents: [0+5] [2+2]
#   follow: 16 new frames = 4 latents after open's last 2: [2+3] [2+1]
#   portrait: 2.0 s -> 17 frames = 5 latents, the image is latent 0: [1+4+1] with the end image
#   branch: 1.4 s -> 12 frames = 3 latents after open's last 2: [2+3]
FILM = """\
title: Test film
resolution: 64x64
fps: 8
seed: 7
defaults:
  steps: 3
  base_num_frames: 17
  overlap_history: 5
  guidance_scale: 5.0
shots:
  - id: open
    prompt: [dawn, noon]
    frames: 25
  - id: follow
    continue: true
    prompt: dusk
    frames: 16
    steps: 2
  - id: portrait
    image: still.png
    end_image: still.png
    prompt: a face
    duration: 2.0
    seed: 100
    transition: {fade: 0.5}
  - id: branch
    continue_from: open
    prompt: night
    duration: 1.4
    guidance_scale: 1
    ar_step: 1
"""

"""Built-in prompts of the diffusers backends, in the four styles of HPD v2 (anime, concept art,
painting, photo). They let a config run as shipped; for the paper's setup point
``sampler.<family>.prompt_file`` / ``eval_prompt_file`` at the HPD v2 prompts (one per line)."""

TRAIN_PROMPTS = [
    "an anime girl with silver hair standing in a field of sunflowers",
    "a cyberpunk city street at night in the rain, neon signs, concept art",
    "an oil painting of a lighthouse on a cliff during a storm",
    "a photo of a golden retriever puppy playing in the snow",
    "a cozy wooden cabin in a pine forest, digital painting",
    "a portrait of an old fisherman with a white beard, dramatic lighting",
    "a red fox sleeping under a maple tree in autumn, watercolor",
    "a futuristic spaceship landing on a desert planet, concept art",
    "a bowl of ramen with a soft-boiled egg, food photography",
    "a samurai standing on a bridge under cherry blossoms, anime style",
    "a still life of lemons and a glass jug, impressionist painting",
    "an astronaut riding a horse on the moon, photorealistic",
    "a medieval castle on a hill above a misty valley at dawn",
    "a cute robot watering plants in a greenhouse, 3d render",
    "a busy market in Marrakech with colorful spices, travel photo",
    "a dragon curled around a mountain peak, fantasy illustration",
]

EVAL_PROMPTS = [
    "a girl reading a book on a train, anime style",
    "an underwater city with glowing jellyfish, concept art",
    "a van gogh style painting of a harbor at night",
    "a close-up photo of a hummingbird drinking from a flower",
    "a snowy mountain village with warm lights in the windows",
    "a steampunk owl made of brass gears, detailed illustration",
    "a vintage car parked in front of a diner, 1950s photo",
    "a knight in shining armor facing a giant wolf, epic painting",
]

"""A small, shipped reference set of general text for measuring forgetting (no network needed).

Short passages across everyday topics, arithmetic, code and instructions: what a general instruction model should
keep doing after it is fine-tuned on a narrow task. Written for this project (no external data set).
"""

from __future__ import annotations

GENERAL_REFERENCE: tuple[str, ...] = (
    "The capital of France is Paris, a city on the river Seine known for its museums and cafes.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees Celsius.",
    "To make a cup of tea, boil water, pour it over the tea leaves and let it steep for three minutes.",
    "The Earth orbits the Sun once a year, and the Moon orbits the Earth about once a month.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # prints 5",
    "Seven plus eight equals fifteen, and twelve divided by four equals three.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "Dear team, thank you for your hard work this week. The meeting is moved to Thursday at 10 am.",
    "A healthy breakfast might include oatmeal, fresh fruit, yogurt and a glass of water.",
    "The French Revolution began in 1789 and changed the political map of Europe.",
    "Q: What is the largest ocean on Earth?\nA: The Pacific Ocean is the largest ocean on Earth.",
    "Regular exercise, enough sleep and a balanced diet help people stay healthy.",
    "Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "To reverse a list in Python, use my_list[::-1] or call my_list.reverse().",
    "The heart pumps blood through the body, carrying oxygen to the muscles and organs.",
    "If it rains tomorrow, we will stay inside and play board games instead of going to the park.",
    "Translate to French: Good morning, how are you? -> Bonjour, comment allez-vous ?",
    "A triangle has three sides, a square has four, and a hexagon has six.",
    "Summarize: The city council approved a new park next to the library, to open next spring.",
    "Mount Everest is the highest mountain above sea level, at about 8,849 metres.",
    "Please write a short poem about autumn leaves falling in the wind.",
    "Electric cars use batteries and motors instead of petrol engines.",
    "The recipe needs two eggs, a cup of flour, half a cup of sugar and a pinch of salt.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
)

"""The four workloads of bench/speculative.py: chat messages (and a JSON Schema for the tool steps).

Real text, not synthetic repeats: the grounded passage is Lincoln's Gettysburg Address (1863, public
domain); the code is a plain Python function of the kind an editor asks a model to change; the tool
steps are what an agent asks of the model, with the arguments in the request, as the app wrote them.
The free-text workload is bench/engine.py's own prompt (built there, cut to 256 tokens).
"""

from __future__ import annotations

GETTYSBURG = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
    "in Liberty, and dedicated to the proposition that all men are created equal.\n\n"
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so conceived and "
    "so dedicated, can long endure. We are met on a great battle-field of that war. We have come to "
    "dedicate a portion of that field, as a final resting place for those who here gave their lives that "
    "that nation might live. It is altogether fitting and proper that we should do this.\n\n"
    "But, in a larger sense, we can not dedicate -- we can not consecrate -- we can not hallow -- this "
    "ground. The brave men, living and dead, who struggled here, have consecrated it, far above our poor "
    "power to add or detract. The world will little note, nor long remember what we say here, but it can "
    "never forget what they did here. It is for us the living, rather, to be dedicated here to the "
    "unfinished work which they who fought here have thus far so nobly advanced. It is rather for us to "
    "be here dedicated to the great task remaining before us -- that from these honored dead we take "
    "increased devotion to that cause for which they gave the last full measure of devotion -- that we "
    "here highly resolve that these dead shall not have died in vain -- that this nation, under God, "
    "shall have a new birth of freedom -- and that government of the people, by the people, for the "
    "people, shall not perish from the earth."
)

GROUNDED = [
    {"role": "system", "content": "You answer from the given passage only, quoting its own words."},
    {
        "role": "user",
        "content": "Passage:\n\n"
        + GETTYSBURG
        + "\n\nQuote, word for word, the sentences of the passage that say what the living must do.",
    },
]

CODE = '''def summarize_orders(orders, currency="EUR"):
    """Total, count and average of the paid orders, per customer."""
    totals = {}
    counts = {}
    for order in orders:
        if order["status"] != "paid":
            continue
        customer = order["customer"]
        amount = order["amount"]
        if order["currency"] != currency:
            amount = convert(amount, order["currency"], currency)
        totals[customer] = totals.get(customer, 0) + amount
        counts[customer] = counts.get(customer, 0) + 1
    result = []
    for customer in sorted(totals):
        average = totals[customer] / counts[customer]
        result.append((customer, totals[customer], counts[customer], average))
    return result
'''

CODE_EDIT = [
    {"role": "system", "content": "You are a careful programming assistant. Reply with code only."},
    {
        "role": "user",
        "content": "Rename the variable `totals` to `sums` in this function and return the whole "
        "updated function:\n\n```python\n" + CODE + "```",
    },
]

TOOLS = (
    'You can call these tools; reply with one JSON object {"tool": ..., "arguments": {...}}.\n'
    "- send_email(recipient, subject, body): send an email\n"
    "- create_event(title, date, time, location): add a calendar event\n"
    "- set_reminder(text, when): remind the user"
)
TOOL_STEPS = [
    "Email alice@example.com with the subject 'Quarterly report draft' and the body 'Hi Alice, the draft "
    "of the quarterly report is ready for your review.'",
    "Add the event 'Team planning meeting' on 2026-12-10 at 14:00 in the Blue Room.",
    "Remind me to 'call the dentist about the appointment' tomorrow at 9am.",
]
TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["send_email", "create_event", "set_reminder"]},
        "arguments": {
            "type": "object",
            "additionalProperties": {"type": "string", "maxLength": 120},
            "maxProperties": 4,
        },
    },
    "required": ["tool", "arguments"],
    "additionalProperties": False,
}


def tool_messages(step: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": TOOLS}, {"role": "user", "content": step}]

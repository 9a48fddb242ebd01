"""The task's default data: labelled contract clauses, generated from templates, cached as JSONL.

Each synthetic contract (a "document") has 15-35 clauses. A clause belongs to one of six
categories, each with its own templates and vocabulary, or to none (boilerplate). In the
multi-label set about one clause in six joins two categories in one sentence, and about half
are boilerplate, like UNFAIR-ToS. The single-label set has the same categories plus `other`.
Documents are split 70/15/15 into train / validation / test, so no contract spans two splits.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

VERSION = 1

PARTIES = ["the Company", "the Provider", "the Supplier", "the Licensor", "the Service Provider", "the Vendor",
           "the Contractor", "the Seller", "the Operator", "the Platform"]
COUNTERPARTIES = ["the Customer", "the User", "the Client", "the Licensee", "the Buyer", "the Subscriber",
                  "the Member", "the Purchaser", "you"]
DURATIONS = ["thirty (30) days", "ten (10) business days", "sixty (60) days", "fourteen (14) days",
             "ninety (90) days", "five (5) days", "one (1) month", "twelve (12) months"]
JURISDICTIONS = ["the State of New York", "England and Wales", "the State of California", "Ireland",
                 "the Province of Ontario", "the State of Delaware", "Germany", "the Netherlands", "Singapore"]
AMOUNTS = ["the fees paid in the preceding twelve months", "one hundred dollars ($100)", "the total contract value",
           "the amounts paid under this Agreement", "five hundred euros (EUR 500)", "the annual subscription fee"]

CATEGORIES: dict[str, dict] = {
    "limitation_of_liability": {
        "templates": [
            "In no event shall {p} be liable for any {harm} arising out of or in connection with {thing}.",
            "{P} shall not be responsible for {harm}, even if advised of the possibility of such damages.",
            "To the maximum extent permitted by law, the aggregate liability of {p} shall not exceed {amount}.",
            "{P} disclaims all liability for {harm} resulting from {thing}.",
            "Under no circumstances will {p} be held liable for {harm} caused by {thing}.",
        ],
        "harm": ["indirect, incidental or consequential damages", "loss of profits or revenue", "loss of data",
                 "any special or punitive damages", "business interruption", "damages of any kind"],
        "thing": ["the use of the services", "any interruption of the platform", "errors or omissions in the content",
                  "the performance of this Agreement", "unauthorised access to your account"],
    },
    "termination": {
        "templates": [
            "{P} may terminate this Agreement at any time {how}, with or without cause.",
            "{P} reserves the right to suspend or terminate the account of {c} {how}.",
            "Either party may terminate this Agreement upon {d} written notice if the other party {breach}.",
            "Upon termination, {c} must immediately cease all use of the services and delete all copies.",
            "{P} may discontinue the services or close {c}'s account {how} if {c} {breach}.",
        ],
        "how": ["without prior notice", "in its sole discretion", "upon written notice", "immediately",
                "for any reason or no reason"],
        "breach": ["materially breaches any provision", "fails to pay any amount when due",
                   "becomes insolvent or bankrupt", "violates these terms"],
    },
    "governing_law": {
        "templates": [
            "This Agreement shall be governed by and construed in accordance with the laws of {j}.",
            "Any dispute arising under these terms shall be subject to the exclusive jurisdiction of the courts of {j}.",
            "The parties irrevocably submit to the {venue} of {j} for the resolution of any claim.",
            "These terms are governed by the laws of {j}, without regard to its conflict of laws principles.",
            "All claims shall be resolved exclusively in the {venue} located in {j}.",
        ],
        "venue": ["state or federal courts", "competent courts", "exclusive venue", "tribunals"],
    },
    "confidentiality": {
        "templates": [
            "{C} shall keep confidential all {info} disclosed by {p} and shall not disclose it to any third party.",
            "The receiving party shall protect the {info} of the disclosing party with at least reasonable care.",
            "{info_cap} shall not be used for any purpose other than the performance of this Agreement.",
            "The obligations of confidentiality shall survive for {d} after the disclosure of any {info}.",
            "Neither party shall reveal {info} to anyone except employees who need to know it.",
        ],
        "info": ["confidential information", "trade secrets", "proprietary information", "non-public business data",
                 "technical and commercial know-how"],
    },
    "payment": {
        "templates": [
            "{C} shall pay all invoices within {d} of the invoice date.",
            "Fees are payable {when} in advance and are non-refundable except as expressly stated.",
            "Late payments shall bear interest at the rate of {rate} per month until paid in full.",
            "{P} may increase the subscription price upon {d} notice to {c}.",
            "All amounts are exclusive of taxes, and {c} is responsible for paying any applicable {tax}.",
        ],
        "when": ["monthly", "annually", "quarterly", "on the first day of each billing period"],
        "rate": ["1.5%", "2%", "one percent", "the maximum rate permitted by law"],
        "tax": ["sales tax", "value added tax", "withholding taxes", "duties and levies"],
    },
    "indemnification": {
        "templates": [
            "{C} agrees to indemnify, defend and hold harmless {p} from any {claims} arising from {cause}.",
            "{C} shall reimburse {p} for all {claims} resulting from {cause}.",
            "{P} shall be indemnified against {claims} brought by third parties in relation to {cause}.",
            "{C} will defend {p} and its affiliates against {claims} relating to {cause}.",
        ],
        "claims": ["claims, losses and expenses, including reasonable attorneys' fees", "third-party claims",
                   "liabilities, damages and costs", "demands and suits"],
        "cause": ["its breach of this Agreement", "any content it uploads", "its violation of applicable law",
                  "its negligence or wilful misconduct", "its use of the services"],
    },
}

BOILERPLATE = [
    "This Agreement constitutes the entire agreement between the parties regarding its subject matter.",
    "Headings are for convenience only and do not affect the interpretation of this Agreement.",
    "{P} provides an online platform that allows {c} to share photos, videos and messages.",
    "{C} must be at least eighteen years old to create an account.",
    "Please read these terms carefully before using the website.",
    "Notices under this Agreement shall be sent by email to the address provided at registration.",
    "If any provision is held invalid, the remaining provisions shall remain in full force and effect.",
    "{P} may offer new features from time to time, which are described on the help pages.",
    "{C} can contact customer support through the form on the website.",
    "These terms were last updated on {date}.",
    "The services include access to documents, templates and tutorials.",
    "{C} is responsible for keeping the password of the account secure.",
    "No waiver of any provision shall be deemed a further or continuing waiver.",
    "This Agreement may be executed in counterparts, each of which is an original.",
]
DATES = ["May 30, 2017", "January 1, 2020", "March 15, 2021", "October 2, 2019", "July 7, 2022"]


def _fill(template: str, category: str | None, rng: random.Random) -> str:
    vocab = CATEGORIES[category] if category else {}
    p, c = rng.choice(PARTIES), rng.choice(COUNTERPARTIES)
    info = rng.choice(vocab.get("info", ["information"]))
    values = {"p": p, "P": p[0].upper() + p[1:], "c": c, "C": c[0].upper() + c[1:], "d": rng.choice(DURATIONS),
              "j": rng.choice(JURISDICTIONS), "amount": rng.choice(AMOUNTS), "date": rng.choice(DATES),
              "info": info, "info_cap": info[0].upper() + info[1:]}
    for key, words in vocab.items():
        if key != "templates" and key != "info":
            values[key] = rng.choice(words)
    return template.format(**values)


def _clause(category: str | None, rng: random.Random) -> str:
    templates = CATEGORIES[category]["templates"] if category else BOILERPLATE
    return _fill(rng.choice(templates), category, rng)


def generate_documents(num_docs: int, multi_label: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = list(CATEGORIES)
    records = []
    for d in range(num_docs):
        doc = f"contract_{d:04d}"
        for _ in range(rng.randint(15, 35)):
            r = rng.random()
            if r < 0.45:
                text, labels = _clause(None, rng), []
            elif multi_label and r > 0.85:
                a, b = rng.sample(names, 2)
                joiner = rng.choice(["; furthermore, ", "; in addition, ", " and, ", "; provided that "])
                second = _clause(b, rng)
                text = _clause(a, rng).rstrip(".") + joiner + second[0].lower() + second[1:]
                labels = sorted([a, b])
            else:
                category = rng.choice(names)
                text, labels = _clause(category, rng), [category]
            if rng.random() < 0.3:  # section numbers, like real contracts
                text = f"{rng.randint(1, 20)}.{rng.randint(1, 9)} {text}"
            record = {"text": text, "doc_id": doc}
            if multi_label:
                record["labels"] = labels
            else:
                record["label"] = labels[0] if labels else "other"
            records.append(record)
    return records


def write_synthetic(folder: Path, multi_label: bool, num_docs: int = 100, seed: int = 0) -> Path:
    """Write {train,validation,test}.jsonl into `folder` (the datamodule hands it a fresh folder of its cache)."""
    records = generate_documents(num_docs, multi_label, seed)
    docs = sorted({r["doc_id"] for r in records})
    random.Random(seed + 1).shuffle(docs)
    n_test = n_val = max(1, round(0.15 * len(docs)))
    split_of = {doc: "test" for doc in docs[:n_test]}
    split_of.update({doc: "validation" for doc in docs[n_test:n_test + n_val]})
    for split in ("train", "validation", "test"):
        with (Path(folder) / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                if split_of.get(r["doc_id"], "train") == split:
                    f.write(json.dumps(r) + "\n")
    return Path(folder)

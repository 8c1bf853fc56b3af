"""A shipped revision's SQL never changes: a database migrated by it must stay the same
database whatever build upgrades it later. Each file a revision runs is recorded here with
its sha256; editing one fails this test. A new revision adds its files here when it ships
(and from then on they are frozen too)."""

from __future__ import annotations

import hashlib
from pathlib import Path

VERSIONS = Path(__file__).resolve().parents[1] / "migrations" / "versions"

SHIPPED = {
    # 0001 as first shipped (2026-11-30), byte for byte
    "0001_initial/schema.sql": "9b45d83aa9573a9b53a836e9aac795284da2e67c09a654fd8df3f42b4dc3da35",
    "0001_initial/functions.sql": "37b41494432d5576c8b627ca81610a3156312324fed6254ada852e552d56a1e4",
    "0001_initial/audit.sql": "7e11adb19b9446855a45183aeddcf24cb1fe020afdc53a968b266b8e2a2dc677",
    "0001_initial/costs.sql": "26bafdc133b29aacd23de2b9114d72d7baaf18765b07da6b92fd2a547a24c953",
    "0001_initial/service.sql": "7a9c7b9eda58d59764a1833ab7ba5e8f3655aadeab5205160156289cacf2265b",
    "0001_initial/ratelimit.sql": "0ec0eb3942394264928e1317604dc9297b8c19a8767930a3cc288e7f8f36b827",
    "0001_initial/privileges.sql": "7da9a5748c798cf464442f190541f2556be7be79528098b6c4f7b0dfb99eabf8",
    # made from the files above for 0002's downgrade
    "0001_initial/definitions.sql": "af48700700a1e95561d7e1bb4b2331a49c031f519dc862f06cea574aa991685c",
    "0002_outbox_statements_and_one_enqueue_rule.sql":
        "8d8c11be24c3e93f27db9b10fec0698c1fe1ff9c544ca470fdaa6685fb13cc5c",
    "0002_outbox_statements_and_one_enqueue_rule.down.sql":
        "53235b4030c27d0a2e95f3f273024583b0d61d50cadba50dbd5a14802394a30b",
    "0003_failure_classes_and_dead_workers.sql":
        "7248de90a846e7a5b68655506876557afbab61ba0ce787a66ddc2bdcc2851971",
    "0003_failure_classes_and_dead_workers.down.sql":
        "403273e376879442f35aea8e6ed0f91a037a700050079cc66996e869b71f7bc9",
    # sql/'s definitions as 0002 shipped them, for 0003's downgrade
    "0003_failure_classes_and_dead_workers.down.definitions.sql":
        "5a81109891a2328dc63f84b77fd5b50ae4baa06c66fb1ac686f079917a39903f",
    "0004_chunking_that_fits_the_model.sql":
        "c4338056b8ad7e0ff5a4867f0200e773bf592dbacf11ae241b70ab84275576fd",
    "0004_chunking_that_fits_the_model.down.sql":
        "dca131caf50d1c07f93e82acca9832a0fa2ab04cb42986d2db636fbcc899b61a",
    # sql/'s definitions as 0003 shipped them, for 0004's downgrade
    "0004_chunking_that_fits_the_model.down.definitions.sql":
        "f1dbc3bc635f3adc21bd81ff73b13d9dfd8be8963426a9d53c24905bfb4eb592",
    "0005_halfvec_and_quantization.sql":
        "69313ff058890c31fb27d3fd512891796dbd331c61f7513bbcf434bfe824c739",
    "0005_halfvec_and_quantization.down.sql":
        "8ce7ea2e592431846802626c6e5e285f2fe96100626a46fdcbf94b77125ec366",
    # sql/'s definitions as 0004 shipped them, for 0005's downgrade
    "0005_halfvec_and_quantization.down.definitions.sql":
        "0ad70d6909588eb605c328d2e7d6f78ed4bd54091909a73655817f961d6247d7",
    "0006_late_chunking_search_names_and_model_migration.sql":
        "9e1188d29fb17dad95148bea5e1c35343082764e181b68e333e3db0dcc743e6e",
    "0006_late_chunking_search_names_and_model_migration.down.sql":
        "4e1f2f6818ccf2fa5c5bcc777d8cf2f497af5dd1f4109df0cfb01b6315ee0367",
    # sql/'s definitions as 0005 shipped them, for 0006's downgrade
    "0006_late_chunking_search_names_and_model_migration.down.definitions.sql":
        "1950aa24ee5a22f54bd376210ebde91a58eae9d1e74a1931fa313cafcf29ee35",
    "0007_gateway_costs_write_through_and_batch_api.sql":
        "109ef3c1d85a5478b5a7d13c8100fd1c05d5b12ecf587ece9a53660820763048",
    "0007_gateway_costs_write_through_and_batch_api.down.sql":
        "32c8476eb45110c03401cb4c6d9b117248952a9ced70e95fb717ea6bb4f07db4",
    # sql/'s definitions as 0006 shipped them, for 0007's downgrade
    "0007_gateway_costs_write_through_and_batch_api.down.definitions.sql":
        "4cfd7e0448c90c447d5469b9381a58e9f54f49c2959fa3103d3c30a4ff17e0a1",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_shipped_revision_file_was_edited():
    edited = [name for name, digest in SHIPPED.items() if sha256(VERSIONS / name) != digest]
    assert not edited, (f"shipped migration SQL changed: {edited}. A schema change is a new revision; "
                        "never edit one that has shipped")


def test_every_revision_file_is_recorded():
    found = {str(p.relative_to(VERSIONS)) for p in VERSIONS.rglob("*.sql")}
    assert found == set(SHIPPED), f"unrecorded: {sorted(found - set(SHIPPED))}, missing: {sorted(set(SHIPPED) - found)}"

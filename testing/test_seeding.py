"""Seeds derived from (seed, round, client): the client's generator and the default generators."""
import torch

from core.seeding import client_generator, derive_seed


def test_client_generator_seeds_dropout_per_client():
    cpu = torch.device("cpu")
    client_generator(cpu, 3, 1, 7)
    first = torch.nn.functional.dropout(torch.ones(64), 0.5)
    torch.manual_seed(12345)  # whatever ran before must not matter
    own = client_generator(cpu, 3, 1, 7)
    again = torch.nn.functional.dropout(torch.ones(64), 0.5)
    client_generator(cpu, 3, 1, 8)
    other = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    expected = torch.Generator().manual_seed(derive_seed(3, 1, 7))
    assert torch.equal(torch.rand(4, generator=own), torch.rand(4, generator=expected))


def test_stream_gives_a_different_sequence():
    cpu = torch.device("cpu")
    a = torch.rand(4, generator=client_generator(cpu, 3, 1, 7))
    b = torch.rand(4, generator=client_generator(cpu, 3, 1, 7, stream=1))
    assert not torch.equal(a, b)


def test_a_run_draw_is_seeded_apart_from_every_clients_training():
    """The server's DP noise of a round (stream 0xD9) must not share a generator with the client whose
    id is 0xD9: a three-key (seed, round, stream) seed would (the first client_generator form)."""
    from core.seeding import run_draw_seed
    cpu = torch.device("cpu")
    for stream in (0xD9, 0xDA, 0xDB):
        run_draw = torch.Generator().manual_seed(run_draw_seed(3, 1, stream))
        draws = torch.rand(8, generator=run_draw)
        for client_stream in (0, 1, stream):
            client = client_generator(cpu, 3, 1, stream, stream=client_stream)
            assert not torch.equal(draws, torch.rand(8, generator=client)), (stream, client_stream)

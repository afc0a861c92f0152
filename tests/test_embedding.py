"""Pretrained inputs: timm weights from a local file, and class embeddings made from them."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from polyinr import data
from polyinr.commands import cli
from polyinr.core import config
from polyinr.core.errors import MissingWeightsError
from polyinr.model.discriminator import FeatureNetwork
from polyinr.training import embedding, run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A stand-in for the pretrained tf_efficientnet_lite0: seeded weights in timm's file
    format at <weights_dir>/<network>.safetensors, where a user puts the real ones."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(123)
    net = timm.create_model(embedding.NETWORK, pretrained=False)
    with torch.no_grad():  # BatchNorm statistics unlike the defaults, so loading them shows
        for name, buf in net.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    save_file(net.state_dict(), str(folder / f"{embedding.NETWORK}.safetensors"))
    return folder, net.state_dict()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Three demo classes at 16 px."""
    root = tmp_path_factory.mktemp("embed")
    data.make_demo_dataset(root / "demo", 3, 4, 16, 0)
    cfg = config.load(
        REPO / "params.yaml",
        [f"data.source={root / 'demo'}", f"data.out_dir={root / 'ffcv'}", "data.workers=1"],
    )
    data.prepare(cfg.data, [16], progress=False)
    return root


def test_feature_network_loads_the_local_pretrained_file(weights_dir):
    """pretrained=true reads <weights_dir>/<name>.safetensors: every tensor as saved."""
    folder, saved = weights_dir
    net = FeatureNetwork(embedding.NETWORK, pretrained=True, weights_dir=str(folder))
    stem = net.taps[0][0].weight
    assert torch.equal(stem, saved["conv_stem.weight"])
    bn = net.taps[3][-1][-1].bn3  # the last block's last BatchNorm
    assert torch.equal(bn.running_var, saved["blocks.6.0.bn3.running_var"])
    random = FeatureNetwork(embedding.NETWORK, pretrained=False, weights_dir=str(folder))
    assert not torch.equal(random.taps[0][0].weight, stem)


def test_missing_pretrained_file_names_it(tmp_path):
    """A network with neither a local file nor a packaged one names where to put it."""
    name = "deit_base_distilled_patch16_224"
    with pytest.raises(MissingWeightsError, match=rf"{name}\.safetensors"):
        FeatureNetwork(name, pretrained=True, weights_dir=str(tmp_path))


def test_class_embeddings_are_standardised_per_class_feature_means(
    weights_dir, prepared, single_thread
):
    """One 320-d row per class: the class means of the pooled features, each feature centred
    and scaled to unit std across classes (the reference table's statistics)."""
    folder, _ = weights_dir
    cfg = config.load(
        REPO / "params.yaml",
        [f"data.source={prepared / 'demo'}", f"data.out_dir={prepared / 'ffcv'}"],
    )
    table = embedding.compute(cfg.data, 16, 3, str(folder), progress=False)
    assert table.shape == (3, 320)
    torch.testing.assert_close(table.mean(dim=0), torch.zeros(320), rtol=0, atol=1e-5)
    torch.testing.assert_close(table.std(dim=0), torch.ones(320), rtol=1e-4, atol=1e-4)
    # Three classes centred: rows sum to zero, so they start apart (cosine about -1/2).
    assert embedding.statistics(table)["mean_cosine"] < -0.3
    # The same computation by hand for every class.
    net = FeatureNetwork(embedding.NETWORK, pretrained=True, weights_dir=str(folder))
    batches = data.read_all(data.beton_path(prepared / "ffcv", 16), workers=1)
    pairs = [(x.clone(), y.clone()) for x, y in batches]  # ffcv reuses its buffers
    images = torch.cat([x for x, _ in pairs])
    labels = torch.cat([y for _, y in pairs])
    means = []
    for k in range(3):
        x = images[labels == k].float() / 127.5 - 1
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
        with torch.no_grad():
            means.append(net(x)[-1].mean(dim=(2, 3)).double().mean(dim=0))
    means = torch.stack(means)
    centred = means - means.mean(dim=0)
    expect = (centred / centred.std(dim=0)).float()
    torch.testing.assert_close(table, expect, rtol=1e-4, atol=1e-4)


def test_standardize_separates_classes_that_share_a_component():
    """Rows dominated by one shared positive component (cosine 0.99) come out centred, at
    unit std per feature and near-orthogonal for many classes; a feature constant across
    classes stays finite; one class keeps a unit-RMS row."""
    torch.manual_seed(0)
    shared = torch.rand(320) + 1
    means = shared + 0.05 * torch.randn(200, 320)
    means[:, 7] = 3.0  # no class differs in this feature
    raw = embedding.statistics(means)
    table = embedding.standardize(means)
    stats = embedding.statistics(table)
    assert raw["mean_cosine"] > 0.99
    assert abs(stats["mean_cosine"]) < 0.02 and stats["max_cosine"] < 0.5
    assert torch.isfinite(table).all() and table[:, 7].abs().max() < 1e-6
    keep = torch.arange(320) != 7
    torch.testing.assert_close(
        table[:, keep].std(dim=0), torch.ones(319, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )
    one = embedding.standardize(means[:1])
    torch.testing.assert_close(one.square().mean(), torch.tensor(1.0, dtype=torch.float64))


def test_statistics_name_the_closest_pair_and_warn_on_parallel_classes():
    """The closest pair is named as the data names its classes; nearly parallel rows are
    listed (what `polyinr class-embeddings` warns about)."""
    torch.manual_seed(1)
    table = torch.randn(4, 320)
    table[3] = table[1] + 0.01 * torch.randn(320)
    stats = embedding.statistics(table, ["n01", "n02", "n03", "n04"])
    assert stats["closest"][:2] == ("n02", "n04") and stats["closest"][2] > 0.99
    assert [p[:2] for p in stats["parallel"]] == [("n02", "n04")]
    assert embedding.statistics(torch.randn(4, 320))["parallel"] == []


def test_cli_writes_embeddings_and_training_starts_from_them(
    weights_dir, prepared, tmp_path, single_thread, capsys
):
    """`polyinr class-embeddings` writes the table; train.embed_init copies it into G."""
    folder, _ = weights_dir
    out = tmp_path / "embed.pt"
    common = [
        f"data.source={prepared / 'demo'}",
        f"data.out_dir={prepared / 'ffcv'}",
        "data.workers=1",
        "generator.num_classes=3",
        "train.stages=[{resolution: 16, kimg: 1}]",
    ]
    # Without pretrained weights the command refuses rather than writing meaningless rows.
    random = ["discriminator.pretrained=false"]
    assert cli.main(["class-embeddings", "--quiet", "--out", str(out), *common, *random]) == 2
    assert "pretrained" in capsys.readouterr().err
    pretrained = ["discriminator.pretrained=true", f"discriminator.weights_dir={folder}"]
    assert cli.main(["class-embeddings", "--quiet", "--out", str(out), *common, *pretrained]) == 0
    printed = capsys.readouterr().out
    assert "mean off-diagonal cosine" in printed and "closest pair n" in printed
    table = embedding.load(out, 3, 320)
    cfg = config.load(REPO / "params.yaml", [*common, f"train.embed_init={out}"])
    g, _, d, *_ = run._stage_models(cfg, cfg.train.stages[0], 3, torch.device("cpu"), None)
    assert torch.equal(g.mapping.embed.weight.detach(), table)
    assert g.mapping.embed.weight.requires_grad  # it stays trainable
    heads = [h for b in d.branches for h in b.heads]
    assert all(torch.equal(h.embed.weight.detach(), table) for h in heads)  # D's too


def test_wrong_or_missing_embedding_file_is_a_clear_error(tmp_path):
    with pytest.raises(embedding.EmbeddingError, match="polyinr class-embeddings"):
        embedding.load(tmp_path / "none.pt", 4, 320)
    embedding.save(torch.zeros(5, 320), tmp_path / "e.pt", {})
    with pytest.raises(embedding.EmbeddingError, match=r"\(5, 320\).*\(4, 320\)"):
        embedding.load(tmp_path / "e.pt", 4, 320)


def test_saving_the_same_table_twice_gives_the_same_bytes(tmp_path):
    """DVC hashes the file: equal tables and metadata must give equal bytes, whatever the
    temporary file name of the atomic write."""
    import hashlib

    from polyinr.training import embedding

    table = torch.arange(12.0).reshape(3, 4)
    digests = set()
    for name in ("a.pt", "b.pt"):
        embedding.save(table, tmp_path / name, {"network": "n"})
        digests.add(hashlib.md5((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1


def test_training_warns_where_the_class_path_starts_weak(tmp_path, capsys):
    """`polyinr train` says in one line when classes start from random embeddings, and names
    classes whose rows start nearly parallel; a table of apart classes gives no warning."""
    from polyinr.training import run

    common = ["generator.num_classes=4", "generator.embed_dim=320"]
    run._check_embed_init(config.load(REPO / "params.yaml", [*common, "train.embed_init=null"]))
    assert "train.embed_init is null" in capsys.readouterr().err
    torch.manual_seed(0)
    table = embedding.standardize(torch.randn(4, 320)).float()
    embedding.save(table, tmp_path / "apart.pt", {})
    run._check_embed_init(
        config.load(REPO / "params.yaml", [*common, f"train.embed_init={tmp_path / 'apart.pt'}"])
    )
    assert capsys.readouterr().err == ""
    table[3] = table[1] * 1.01
    embedding.save(table, tmp_path / "alike.pt", {})
    run._check_embed_init(
        config.load(REPO / "params.yaml", [*common, f"train.embed_init={tmp_path / 'alike.pt'}"])
    )
    assert "classes 1 and 3 start nearly parallel" in capsys.readouterr().err

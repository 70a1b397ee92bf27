""" Hostile files, round 2: a few bytes of config.json, YAML or weights cannot make the program allocate gigabytes
or run for minutes, and the remaining user mistakes end in one `error:` line (exit status 2). """
import json
import resource
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import save_file

import bam_models  # noqa: F401  (registers the zoo)
from bam_models.checkpoint import read_state_dict
from bam_models.cli import main
from bam_models.errors import BamModelsError, CheckpointError, ConfigError, UsageError, count, excerpt
from bam_models.hub import insert_into_folder
from bam_models.hub.load import create_model_from_name
from bam_models.insert.inserted import check_attention_args
from bam_models.layers import BAM, CBAM
from bam_models.train.config import load_config

BASE = 'test_efficientnet'  # a small timm CNN with stages: quick to build, insert into and save


def _one_error(capsys, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope='module')
def inserted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('inserted') / 'bam'
    insert_into_folder(BASE, 'bam', folder)
    return folder


def _edited(inserted: Path, folder: Path, **model_args) -> str:
    """A copy of the inserted folder whose config.json's model_args are updated, as a `local-dir:` name."""
    shutil.copytree(inserted, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(model_args)
    (folder / 'config.json').write_text(json.dumps(config))
    return f'local-dir:{folder}'


@pytest.mark.parametrize('attention_args, fragment', [
    ({'num_dilated': 100_000}, "'num_dilated' is 100000; use a value in [0, 16]"),
    ({'rd_channels': 1_000_000}, "'rd_channels' is 1000000"),
    ({'rd_channels': 5000}, 'rd_channels is 5000 but'),  # within the bound, wider than every stage
    ({'rd_divisor': 0}, "'rd_divisor' is 0"),
    ({'act_layer': 'os.system'}, "'act_layer' is 'os.system'; name an activation timm knows"),
    ({'act_layer': ['relu']}, "'act_layer' is ['relu']"),
    ({'rd_ratio': 'big'}, "'rd_ratio' is 'big'; BAM takes float there"),
    ({'num_dilatd': 2}, "key 'num_dilatd' is not an argument of BAM; did you mean num_dilated?"),
    ({'fusion': 'mul'}, "BAM fusion must be one of"),  # the layer's own check, run on the meta device
])
def test_attention_args_from_a_folder_are_checked_before_building(inserted, tmp_path, attention_args, fragment):
    name = _edited(inserted, tmp_path / 'edited', attention_args=attention_args)
    rss, start = _max_rss_mb(), time.monotonic()
    with pytest.raises(UsageError) as info:
        create_model_from_name(name, pretrained=True)
    assert fragment in str(info.value) and '\n' not in str(info.value)
    assert time.monotonic() - start < 10 and _max_rss_mb() - rss < 300


@pytest.mark.parametrize('layer', [BAM, CBAM], ids=['bam', 'cbam'])
def test_the_layers_and_the_file_check_enforce_one_declaration_of_bounds(layer):
    attention = layer.__name__.lower()
    for key, (low, high) in layer.BOUNDS.items():
        for outside in (low - 1, high * 2 + 1):  # high * 2 + 1 is odd: spatial_kernel_size fails on its bound
            with pytest.raises(ValueError, match=rf'{key} is {outside!r}; use a value in \['):
                layer(64, device='meta', **{key: outside})
            with pytest.raises(UsageError, match=rf"'{key}' is {outside!r}; use a value in \["):
                check_attention_args(attention, {key: outside})
        for inside in (low, high):  # the bounds themselves are allowed by both
            layer(64, device='meta', **{key: inside})
            assert check_attention_args(attention, {key: inside}) == {key: inside}


def test_a_bound_changed_in_the_layer_is_enforced_by_the_file_check_too(monkeypatch):
    monkeypatch.setitem(BAM.BOUNDS, 'num_dilated', (0, 1))
    with pytest.raises(ValueError, match=r'BAM num_dilated is 2; use a value in \[0, 1\]'):
        BAM(64, num_dilated=2, device='meta')
    with pytest.raises(UsageError, match=r"'num_dilated' is 2; use a value in \[0, 1\]"):
        check_attention_args('bam', {'num_dilated': 2})


def test_good_attention_args_from_a_folder_still_build(inserted, tmp_path):
    name = _edited(inserted, tmp_path / 'silu', attention_args={'act_layer': 'silu'})
    model = create_model_from_name(name, pretrained=False)
    assert {type(m).__name__ for m in model.modules()} >= {'BAM', 'SiLU'}
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_base_model_with_attention_already_is_refused(inserted, tmp_path, capsys):
    own = _edited(inserted, tmp_path / 'own', base_model=f'local-dir:{tmp_path / "own"}')
    _one_error(capsys, ['export', own, tmp_path / 'out', '--random-init'], 'has attention inserted already')
    a, b = tmp_path / 'a', tmp_path / 'b'
    _edited(inserted, a, base_model=f'local-dir:{b}')
    _edited(inserted, b, base_model=f'local-dir:{a}')
    with pytest.raises(UsageError, match='has attention inserted already'):
        create_model_from_name(f'local-dir:{a}', pretrained=False)
    zoo = _edited(inserted, tmp_path / 'zoo', base_model='resnet18_bam')
    with pytest.raises(UsageError, match='already has BAM modules'):
        create_model_from_name(zoo, pretrained=False)


def test_architecture_far_larger_than_its_weights_is_refused_up_front(inserted, tmp_path, capsys):
    name = _edited(inserted, tmp_path / 'wide', num_classes=200_000_000)  # a 256 GB classifier
    rss = _max_rss_mb()
    _one_error(capsys, ['export', name, tmp_path / 'out'], 'parameters but model.safetensors holds',
               'less than one per parameter')
    assert _max_rss_mb() - rss < 300
    unknown = _edited(inserted, tmp_path / 'unknown', bogus_kw=3)
    _one_error(capsys, ['export', unknown, tmp_path / 'out'], "unexpected keyword argument 'bogus_kw'")


@pytest.mark.parametrize('source', ['config.json', 'best.pth'])
@pytest.mark.parametrize('stored, fragment', [
    ({'input_size': [3, 100_000, 100_000]}, 'input_size [3, 100000, 100000] with crop_pct'),  # 120 GB an image
    ({'input_size': [3, 224, 224], 'crop_pct': 1e-6}, 'resizes images to more than 4096 px'),
    ({'input_size': 'x'}, "input_size 'x' is not (channels, height, width)"),
    ({'input_size': [3, 64, 64], 'std': [0, 1, 1]}, 'std [0, 1, 1] is not a list of positive numbers'),
])
def test_stored_preprocessing_cannot_ask_for_huge_or_unusable_images(inserted, tmp_path, capsys, source, stored,
                                                                      fragment):
    image = tmp_path / 'red.png'
    Image.new('RGB', (40, 30), (200, 30, 30)).save(image)
    if source == 'config.json':
        folder = Path(shutil.copytree(inserted, tmp_path / 'folder'))
        config = json.loads((folder / 'config.json').read_text())
        config['pretrained_cfg'].update(stored)
        (folder / 'config.json').write_text(json.dumps(config))
        model = ['--model', f'local-dir:{folder}']
    else:
        checkpoint = tmp_path / 'best.pth'
        state_dict = timm.create_model('resnet18_bam', num_classes=3).state_dict()
        torch.save({'state_dict': state_dict, 'data_config': stored}, checkpoint)
        model = ['--model', 'resnet18_bam', '--checkpoint', checkpoint]
    rss = _max_rss_mb()
    _one_error(capsys, ['visualize', *model, '--image', image, '--out', tmp_path / 'maps.png'],
               'the preprocessing stored with ', fragment)
    assert _max_rss_mb() - rss < 300 and not (tmp_path / 'maps.png').exists()


def _laughs(levels: int) -> str:
    items = ['&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]']
    items += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return 'data:\n  dataset: [' + ', '.join(items) + ']\n'


@pytest.mark.parametrize('levels', [8, 9])
def test_yaml_alias_expansion_is_bounded(tmp_path, levels):
    path = tmp_path / 'laughs.yaml'
    path.write_text(_laughs(levels))
    assert len(path.read_bytes()) < 450
    rss, start = _max_rss_mb(), time.monotonic()
    with pytest.raises(ConfigError, match='expands to more than 10,000 values') as info:
        load_config(str(path))
    assert len(str(info.value)) < 300 and time.monotonic() - start < 5 and _max_rss_mb() - rss < 100


def test_messages_quote_short_excerpts_of_long_values(tmp_path):
    path = tmp_path / 'long.yaml'
    path.write_text('data:\n  batch_size: ' + 'x' * 100_000 + '\n')
    with pytest.raises(ConfigError, match="'data.batch_size' must be int") as info:
        load_config(str(path))
    assert len(str(info.value)) < 250
    nested = [[list(range(1000))] * 1000] * 1000  # a billion items, shared
    assert len(excerpt(nested)) <= 80 and len(excerpt('y' * 10 ** 6)) <= 80
    assert excerpt(10 ** 5000) == '<int too long to print>'
    assert (count(1, 'key'), count(2, 'key'), count(1, 'key differs', 'keys differ')) == (
        '1 key', '2 keys', '1 key differs')


@pytest.mark.parametrize('overrides, fragment', [
    (['train.seed=100000000000000000000'], "'train.seed' is 100000000000000000000 but must be in [0, 4294967295]"),
    (['schedule.epochs=5', 'schedule.warmup_epochs=5'], "'schedule.warmup_epochs' is 5 but the run has only 5"),
    (['schedule.epochs=1', 'schedule.warmup_epochs=1'], "has only 1 epoch (schedule.epochs), so it would never"),
    (['train.seed=' + '9' * 5000], 'cannot be read'),
])
def test_ranges_checked_before_work(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert fragment in str(info.value) and len(str(info.value)) < 300


def test_tensors_claiming_more_than_their_storage_are_refused(tmp_path, capsys):
    model = timm.create_model('resnet18_bam', num_classes=10)
    state = model.state_dict()
    state['layer1.0.conv1.weight'] = torch.zeros(1).expand(64, 64, 3, 3)
    torch.save(state, tmp_path / 'expanded.pth')
    torch.save({'fc.weight': torch.zeros(1).expand(10 ** 6, 10 ** 6)}, tmp_path / 'huge.pth')  # 4 TB claimed
    assert (tmp_path / 'huge.pth').stat().st_size < 4000
    rss = _max_rss_mb()
    for name in ('expanded.pth', 'huge.pth'):
        with pytest.raises(CheckpointError, match='whose shape claims more data than the file holds'):
            read_state_dict(tmp_path / name)
    _one_error(capsys, ['validate', '--model', 'resnet18_bam', '--checkpoint', tmp_path / 'huge.pth', '--data',
                        'digits'], '4,000,000,000,000 bytes from 4 stored')
    _one_error(capsys, ['convert', '--from', 'torchvision', '--arch', 'resnet18_bam', tmp_path / 'huge.pth',
                        tmp_path / 'out'], 'claims more data')
    assert _max_rss_mb() - rss < 300 and not (tmp_path / 'out').exists()


def test_safetensors_header_claiming_more_than_the_file_is_refused(tmp_path):
    path = tmp_path / 'lying.safetensors'
    save_file({'w': torch.zeros(4)}, path)
    data = path.read_bytes()
    header_len = struct.unpack('<Q', data[:8])[0]
    header = json.loads(data[8:8 + header_len])
    header['w']['shape'] = [10 ** 6, 10 ** 6]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(raw)) + raw + data[8 + header_len:])
    with pytest.raises(CheckpointError, match='could not be read as weights'):
        read_state_dict(path)


def test_convert_refuses_what_loading_refuses(tmp_path, capsys):
    state = timm.create_model('resnet18').state_dict()
    state['conv1.weight'] = state['conv1.weight'].long()
    torch.save(state, tmp_path / 'int64.pth')
    _one_error(capsys, ['convert', '--from', 'torchvision', '--arch', 'resnet18_bam', tmp_path / 'int64.pth',
                        tmp_path / 'out'], '1 mismatched tensor (e.g. conv1.weight: checkpoint torch.int64')
    assert not (tmp_path / 'out').exists()


def test_publish_with_a_broken_or_missing_manifest(tmp_path, capsys):
    broken = tmp_path / 'broken.json'
    broken.write_text('{"weights": ')
    checkpoint = tmp_path / 'x.safetensors'
    for manifest in (broken, tmp_path / 'missing.json'):
        _one_error(capsys, ['publish', 'resnet18_bam.x', '--checkpoint', checkpoint, '--out', tmp_path / 'o',
                            '--manifest', manifest], str(manifest), 'pass --manifest the path of a valid')


def test_insert_messages(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    _one_error(capsys, ['insert', BASE, tmp_path / 'file' / 'sub'], 'which is a file')
    _one_error(capsys, ['insert', 'mobilenetv3_small_050', tmp_path / 'cbam', '--attention', 'cbam'],
               'pass --replace-existing to replace them')


def test_export_suggests_random_init_once(tmp_path, capsys):
    line = _one_error(capsys, ['export', 'resnet18_bam', tmp_path / 'out'], 'has no pretrained weights')
    assert line.count('--random-init') == 1, line


def test_checkpoint_of_another_architecture_names_the_one_it_fits(tmp_path, capsys):
    torch.save(timm.create_model('resnet18_cbam', num_classes=10).state_dict(), tmp_path / 'cbam.pth')
    for command in (['validate', '--model', 'resnet18_bam', '--data', 'digits'],
                    ['export', 'resnet18_bam', tmp_path / 'out']):
        _one_error(capsys, [*command, '--checkpoint', tmp_path / 'cbam.pth'], 'its keys fit resnet18_cbam')


def test_an_unreachable_hub_fails_within_one_connect_timeout(tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(('127.0.0.1', 0))
        endpoint = f'http://127.0.0.1:{probe.getsockname()[1]}'
    monkeypatch.setattr(hf_constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(hf_constants, 'HUGGINGFACE_CO_URL_TEMPLATE',
                        endpoint + '/{repo_id}/resolve/{revision}/{filename}')
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    start = time.monotonic()
    with pytest.raises(BamModelsError, match='could not be reached'):
        create_model_from_name('resnet18_bam.tv_in1k', pretrained=True)
    assert time.monotonic() - start < 8  # huggingface_hub's own retries took 28 s
